"""Slide contrast (``--slide-contrast``): ABMIL classifying its attended tiles relative to the slide's mean tile.

What every tile of a slide shares cannot move the prediction; a lesion of a few tiles that stands out from
its own slide still does, where a head without it learns the slides by what they share. A class that shows
in every tile (a subtype) gives such a head little to go on: the default (``auto``) trains both kinds and
keeps the one with the lowest validation loss of five plain and five contrast heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidemil.config import load_config
from slidemil.errors import ConfigError
from slidemil.models.mil import AttentionMIL, BagHead, HeadConfig, create_head, max_instance_loss
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.task import build_head

D = 16


def _head(contrast: bool, seed: int = 0, mil_type: str = "gated", hidden: int = 16) -> AttentionMIL:
    torch.manual_seed(seed)
    head = create_head(HeadConfig(mil_type=mil_type, in_dim=D, n_classes=2, hidden_dim=hidden, attention_dim=8,
                                  dropout=0.0, slide_contrast=contrast))
    assert isinstance(head, AttentionMIL)
    return head


@pytest.mark.parametrize("mil_type", ["gated", "simple"])
def test_a_slide_of_one_look_says_nothing(mil_type: str) -> None:
    """A bag whose tiles all look alike has nothing that stands out: its logits are the classifier's bias,
    whatever the look; without contrast the look decides."""
    head = _head(True, mil_type=mil_type).eval()
    plain = _head(False, mil_type=mil_type).eval()
    looks = [torch.randn(1, 1, D).expand(1, 30, D) for _ in range(3)]
    with torch.no_grad():
        for look in looks:
            torch.testing.assert_close(head(look).logits[0], head.classifier.bias)
        assert not torch.allclose(plain(looks[0]).logits, plain(looks[1]).logits)


def test_bag_logits_are_the_attention_weighted_relative_tile_logits_and_padding_is_ignored() -> None:
    head = _head(True).eval()
    bags = [torch.randn(n, D) for n in (3, 9, 1)]
    features, mask = torch.zeros(3, 9, D), torch.zeros(3, 9, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    with torch.no_grad():
        batched = head(features, mask).logits
        alone = [head(bag[None]) for bag in bags]
        torch.testing.assert_close(batched, torch.cat([out.logits for out in alone]))
        for bag, out in zip(bags, alone, strict=True):
            weighted = (out.attention[0, :, None] * head.instance_logits(bag[None])[0]).sum(dim=0)
            torch.testing.assert_close(out.logits[0], weighted)


def test_relative_max_instance_term_ignores_a_slide_wide_shift() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 12, 2), torch.tensor([0, 1])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    shifted = logits + torch.tensor([[[3.0, -2.0]], [[-1.0, 4.0]]])  # one offset per bag and class
    torch.testing.assert_close(max_instance_loss(shifted, mask, labels, relative=True),
                               max_instance_loss(logits, mask, labels, relative=True))
    assert not torch.allclose(max_instance_loss(shifted, mask, labels), max_instance_loss(logits, mask, labels))


def test_onnx_parity(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from slidemil.models.onnx import export_head

    bag_head = BagHead(_head(True))
    path = export_head(bag_head, tmp_path / "head.onnx", D)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 500, 20000):
        x = torch.randn(n, D)
        got = session.run(["probabilities", "attention"], {"features": x.numpy()})
        with torch.no_grad():
            _, probabilities, attention, _ = bag_head(x)
        assert np.abs(got[0] - probabilities.numpy()).max() <= 1e-5
        assert np.abs(got[1] - attention.numpy()).max() <= 1e-5


def test_a_contrast_head_learns_through_the_trainer_and_is_saved_as_one(tmp_path: Path) -> None:
    """Patients' slides share a look (an offset on every tile, sd 1 per feature); lesions of 4 tiles. The
    contrast head learns as the default does on such a cohort, and the head kept of two initialisations is
    saved and rebuilt as a contrast head."""
    from slidemil.artifacts.checkpoint import load_head
    from slidemil.trainer.run import run_training
    from tests.trainer_fixtures import fast_config, make_feature_cohort

    root = make_feature_cohort(tmp_path / "cohort", n_slides=40, patient_shift=1.0)
    (result,) = run_training(fast_config(root, **{"model.slide_contrast": "on", "model.inits": 2}), tmp_path / "run")
    assert result.val_metrics["auc"] >= 0.95 and result.test_metrics["auc"] >= 0.95
    assert result.test_metrics["balanced_accuracy"] >= 0.8
    head, meta = load_head(tmp_path / "run" / "checkpoint_best")
    assert isinstance(head, AttentionMIL) and head.contrast and meta["head_config"]["slide_contrast"] is True
    assert meta["head_config"]["ensemble"] == 1 and meta["inits"]["n"] == 2
    assert meta["inits"]["slide_contrast"] == [True, True]


def test_auto_trains_both_kinds_and_keeps_a_plain_head_when_the_class_is_slide_wide(tmp_path: Path) -> None:
    """Every tile of a positive slide carries the class (as a tumour subtype does): the contrast heads have
    little to go on and end with far higher validation losses than the plain ones, so the default keeps a
    plain head, which classifies the test slides."""
    from slidemil.artifacts.checkpoint import load_head
    from slidemil.trainer.run import run_training
    from tests.trainer_fixtures import fast_config, make_feature_cohort

    root = make_feature_cohort(tmp_path / "cohort", n_slides=40, slide_wide=True, shift=0.3)
    (result,) = run_training(fast_config(root), tmp_path / "run")  # the default: auto, 5 heads of each kind
    assert result.test_metrics["auc"] >= 0.95 and result.test_metrics["balanced_accuracy"] >= 0.9
    head, meta = load_head(tmp_path / "run" / "checkpoint_best")
    record = meta["inits"]
    assert record["slide_contrast"] == [False] * 5 + [True] * 5
    assert not record["slide_contrast"][record["kept"]]
    assert isinstance(head, AttentionMIL) and not head.contrast and meta["head_config"]["slide_contrast"] is False
    kinds = list(zip(record["val_loss"], record["slide_contrast"], strict=True))
    assert max(v for v, c in kinds if not c) < min(v for v, c in kinds if c) / 10


def test_a_mixed_ensemble_builds_each_member_as_recorded() -> None:
    cfg = HeadConfig(mil_type="simple", in_dim=D, hidden_dim=8, attention_dim=4, ensemble=3,
                     member_contrast=(False, True, False))
    head = create_head(cfg)
    assert [m.contrast for m in head.heads()] == [False, True, False]  # type: ignore[attr-defined]
    assert [m.config.slide_contrast for m in head.heads()] == [False, True, False]  # what keep_member saves
    again = HeadConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.contrast_per_member() == (False, True, False)
    with pytest.raises(ConfigError, match="each of the 3 members"):
        HeadConfig(mil_type="gated", in_dim=D, ensemble=3, member_contrast=(False, True))
    with pytest.raises(ConfigError, match="slide_contrast"):
        HeadConfig(mil_type="dsmil", in_dim=D, ensemble=2, member_contrast=(False, True))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, (False,) * 5 + (True,) * 5),  # the default: auto, 5 of each kind, the validation loss keeps one
    ({"model.inits": 2}, (False, False, True, True)),
    ({"model.inits": 1}, (False,)),  # nothing to choose between
    ({"model.init_choice": "average"}, (False,) * 5),  # kept together: no choice
    ({"model.mil": "clam_sb"}, (False,) * 5),
    ({"model.slide_contrast": "on", "model.inits": 2}, (True, True)),
    ({"model.slide_contrast": "off"}, (False,) * 5),
    ({"model.slide_contrast": True, "model.inits": 3}, (True,) * 3),  # YAML 1.1 reads on and off as booleans
    ({"model.slide_contrast": False}, (False,) * 5),
])
def test_auto_trains_both_kinds_only_where_the_validation_loss_chooses(overrides: dict,
                                                                            expected: tuple[bool, ...]) -> None:
    assert load_config(TrainConfig, None, overrides).model.contrast_per_head() == expected


def test_configuration() -> None:
    with pytest.raises(ConfigError, match="slide_contrast"):
        HeadConfig(mil_type="clam_sb", in_dim=D, slide_contrast=True)
    with pytest.raises(ConfigError, match="--mil gated or simple"):  # before any data is read
        load_config(TrainConfig, None, {"model.slide_contrast": "on", "model.mil": "transmil"})
    cfg = load_config(TrainConfig, None, {"model.slide_contrast": "on", "model.inits": 1})
    head = build_head(cfg, D, 2)
    assert isinstance(head, AttentionMIL) and head.contrast and head.config is not None
    assert HeadConfig.from_dict(head.config.to_dict()).slide_contrast
    older = HeadConfig.from_dict({"mil_type": "gated", "in_dim": D, "ensemble": 2})  # records before both fields
    assert not older.slide_contrast and older.contrast_per_member() == (False, False)
    mixed = build_head(load_config(TrainConfig, None, {"model.inits": 2}), D, 2)  # auto: 2 of each kind
    assert mixed.config is not None and mixed.config.member_contrast == (False, False, True, True)
    assert mixed.config.ensemble == 4
    assert not mixed.config.slide_contrast
