"""Slide contrast (``--slide-contrast``): ABMIL classifying its attended tiles relative to the slide's mean tile.

What every tile of a slide shares cannot move the prediction; a lesion of a few tiles that stands out from
its own slide still does, where a head without it learns the slides by what they share."""

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
    (result,) = run_training(fast_config(root, **{"model.slide_contrast": True, "model.inits": 2}), tmp_path / "run")
    assert result.val_metrics["auc"] >= 0.95 and result.test_metrics["auc"] >= 0.95
    assert result.test_metrics["balanced_accuracy"] >= 0.8
    head, meta = load_head(tmp_path / "run" / "checkpoint_best")
    assert isinstance(head, AttentionMIL) and head.contrast and meta["head_config"]["slide_contrast"] is True
    assert meta["head_config"]["ensemble"] == 1 and meta["inits"]["n"] == 2


def test_configuration() -> None:
    with pytest.raises(ConfigError, match="slide_contrast"):
        HeadConfig(mil_type="clam_sb", in_dim=D, slide_contrast=True)
    with pytest.raises(ConfigError, match="--mil gated or simple"):  # before any data is read
        load_config(TrainConfig, None, {"model.slide_contrast": True, "model.mil": "transmil"})
    cfg = load_config(TrainConfig, None, {"model.slide_contrast": True, "model.inits": 1})
    head = build_head(cfg, D, 2)
    assert isinstance(head, AttentionMIL) and head.contrast and head.config is not None
    assert HeadConfig.from_dict(head.config.to_dict()).slide_contrast
    assert not HeadConfig.from_dict({"mil_type": "gated", "in_dim": D}).slide_contrast  # older records
