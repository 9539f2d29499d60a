"""Every MIL head: forward, mask, auxiliary loss, checkpoint folding, ONNX export and ONNX Runtime parity,
a 50,000 x 2560 bag, and training through the loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.models.mil import (
    HEAD_OUTPUTS,
    PER_CLASS_OUTPUT,
    BagHead,
    HeadConfig,
    MILHead,
    create_head,
    list_heads,
    max_instance_loss,
)
from slidemil.models.onnx import export_head
from slidemil.models.transmil import PPEG, iterative_pinv, segment_means_matrix
from slidemil.trainer.data import BagBatch
from slidemil.trainer.features_mode import FeatureMIL

D, C = 24, 3
HEADS = list_heads()
PER_CLASS = {"clam_mb", "dsmil"}


def _head(name: str, n_classes: int = C, in_dim: int = D, seed: int = 0, **kw: object) -> MILHead:
    torch.manual_seed(seed)
    cfg = HeadConfig(mil_type=name, in_dim=in_dim, n_classes=n_classes, hidden_dim=32, attention_dim=16, n_heads=4,
                     landmarks=16, **kw)  # type: ignore[arg-type]
    return create_head(cfg).eval()


@pytest.mark.parametrize("name", HEADS)
def test_forward_shapes_and_attention(name: str) -> None:
    head = _head(name)
    with torch.no_grad():
        out = head(torch.randn(2, 40, D))
    assert out.logits.shape == (2, C)
    assert out.attention.shape == out.attention_raw.shape == (2, 40)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    torch.testing.assert_close(torch.softmax(out.attention_raw, 1), out.attention)
    assert head.per_class_attention == (name in PER_CLASS)
    if name in PER_CLASS:
        assert out.attention_per_class is not None and out.attention_per_class.shape == (2, C, 40)
        torch.testing.assert_close(out.attention_per_class.sum(-1), torch.ones(2, C))
        predicted = out.logits.argmax(1)  # ``attention`` is the predicted class's map
        torch.testing.assert_close(out.attention, out.attention_per_class[torch.arange(2), predicted])
    else:
        assert out.attention_per_class is None


@pytest.mark.parametrize("name", HEADS)
def test_padding_is_ignored(name: str) -> None:
    head = _head(name)
    bags = [torch.randn(n, D) for n in (5, 13, 1)]
    features = torch.full((3, 13, D), float("nan"))  # padding never leaks in, even as NaN
    mask = torch.zeros(3, 13, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, :len(bag)] = bag
        mask[i, :len(bag)] = True
    with torch.no_grad():
        batched = head(features, mask)
        alone = [head(bag[None]) for bag in bags]
    for i, (bag, single) in enumerate(zip(bags, alone)):
        n = len(bag)
        torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.attention[i, :n], single.attention[0], rtol=1e-5, atol=1e-6)
        assert torch.all(batched.attention[i, n:] == 0) and torch.all(batched.attention_raw[i, n:] == float("-inf"))
        if name in PER_CLASS:
            assert batched.attention_per_class is not None and single.attention_per_class is not None
            assert torch.all(batched.attention_per_class[i, :, n:] == 0)
            torch.testing.assert_close(batched.attention_per_class[i, :, :n], single.attention_per_class[0],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", HEADS)
def test_one_tile_bag(name: str) -> None:
    with torch.no_grad():
        out = _head(name)(torch.randn(1, 1, D))
    assert torch.isfinite(out.logits).all() and float(out.attention[0, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", HEADS)
def test_auxiliary_loss(name: str) -> None:
    head = _head(name, dropout=0.0).train()
    head.keep_for_loss = True
    features, labels = torch.randn(2, 30, D), torch.tensor([1, 2])
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    out = head(features, mask)
    aux = head.auxiliary_loss(labels)
    if name == "transmil":
        assert aux is None and head.default_instance_weight == 0
        return
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux)
    (out.logits.sum() + aux).backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)  # DDP needs every gradient
    with pytest.raises(RuntimeError, match="keep_for_loss"):
        head.auxiliary_loss(labels)  # released after use
    head.eval()
    with torch.no_grad():
        head(features, mask)
    with pytest.raises(RuntimeError):
        head.auxiliary_loss(labels)  # nothing kept outside training


def test_auxiliary_terms_by_hand() -> None:
    features, labels = torch.randn(1, 20, D), torch.tensor([2])
    for name in ("gated", "dsmil"):  # the max-instance term on the head's own per-tile logits
        head = _head(name, dropout=0.0).train()
        head.keep_for_loss = True
        head(features)
        aux = head.auxiliary_loss(labels, k=2)
        inst = (head.instance_classifier if name == "dsmil" else head.classifier)(head.projection(features))
        expected = max_instance_loss(inst, torch.ones(1, 20, dtype=torch.bool), labels, 2)
        assert aux is not None and float(aux.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # CLAM: padded tiles never enter the clustering term; a padded bag's term equals the bag's alone
    head = _head("clam_mb", dropout=0.0).train()
    head.keep_for_loss = True
    head(features)
    alone = head.auxiliary_loss(labels, k=3)
    padded = torch.cat([features, torch.full((1, 6, D), 1e3)], dim=1)  # huge padding would dominate if selected
    mask = torch.cat([torch.ones(1, 20, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)], dim=1)
    head(padded, mask)
    assert alone is not None and float(alone.detach()) == pytest.approx(float(head.auxiliary_loss(labels, k=3).detach()), rel=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_checkpoint_folds_the_standardisation(name: str) -> None:
    model = FeatureMIL(_head(name)).eval()
    model.feature_mean.copy_(torch.randn(D))
    model.feature_scale.copy_(torch.rand(D) + 0.5)
    x = torch.randn(1, 17, D) * 3 + 1
    batch = BagBatch(x, torch.ones(1, 17, dtype=torch.bool), torch.tensor([0]), torch.tensor([0]))
    with torch.no_grad():
        expected = model(batch)
        saved = _head(name, seed=1)
        saved.load_state_dict({k[len("head."):]: v for k, v in model.checkpoint_state().items()})
        got = saved(x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.attention, expected.attention, rtol=1e-4, atol=1e-6)


def test_config_round_trip_and_old_records() -> None:
    cfg = HeadConfig(mil_type="transmil", in_dim=D, n_classes=C, hidden_dim=64, n_heads=4, landmarks=32)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    old = {"mil_type": "gated", "in_dim": D, "n_classes": 2, "hidden_dim": 256, "attention_dim": 128, "dropout": 0.25}
    assert HeadConfig.from_dict(old).landmarks == 128  # records written before the new fields still load
    from slidemil.errors import ConfigError
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        HeadConfig(mil_type="transmil", in_dim=D, n_classes=2, hidden_dim=30, n_heads=4)


def test_ppeg_is_the_papers_convolution_on_the_filled_square() -> None:
    torch.manual_seed(0)
    ppeg, dim = PPEG(6).eval(), 6
    for n in (1, 2, 3, 10, 17, 50):
        x = torch.randn(2, n + 1, dim)
        side = math.ceil(math.sqrt(n))
        tokens = x[:, 1:]
        square = torch.cat([tokens, tokens[:, :side * side - n]], 1).transpose(1, 2).reshape(2, dim, side, side)
        paper = square + ppeg.proj7(square) + ppeg.proj5(square) + ppeg.proj3(square)
        with torch.no_grad():
            ours = ppeg(x)
        torch.testing.assert_close(ours[:, 1:], paper.flatten(2).transpose(1, 2)[:, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[:, 0], x[:, 0])


def test_nystrom_parts() -> None:
    for length in (1, 5, 16, 17, 100):
        seg = segment_means_matrix(torch.tensor([length]), length, 16, torch.float32, torch.device("cpu"))
        torch.testing.assert_close(seg.sum(1), torch.ones(16))  # every landmark averages at least one token
        assert bool((seg > 0).sum(0).min() >= 1)  # every token is in a segment
    a = torch.softmax(torch.randn(3, 8, 8), -1)
    torch.testing.assert_close(iterative_pinv(a, 20) @ a, torch.eye(8).expand(3, 8, 8), rtol=1e-3, atol=1e-3)


def _onnx_session(head: MILHead, path: Path, exporter: str = "legacy"):  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    bag_head = BagHead(head)
    export_head(bag_head, path, head.in_dim, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return bag_head, session


@pytest.mark.parametrize("name", HEADS)
def test_onnx_export_and_runtime_parity(name: str, tmp_path: Path) -> None:
    bag_head, session = _onnx_session(_head(name), tmp_path / "head.onnx")
    names = [o.name for o in session.get_outputs()]
    assert tuple(names) == bag_head.output_names == ((*HEAD_OUTPUTS, PER_CLASS_OUTPUT) if name in PER_CLASS
                                                     else HEAD_OUTPUTS)
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300, 3000):
        x = (2 * rng.standard_normal((n, D))).astype(np.float32)
        got = dict(zip(names, session.run(None, {"features": x})))
        with torch.no_grad():
            ref = {k: t.numpy() for k, t in zip(names, bag_head(torch.from_numpy(x)))}
        assert np.abs(got["probabilities"] - ref["probabilities"]).max() <= 1e-5, (n, got, ref)
        assert got["probabilities"].argmax() == ref["probabilities"].argmax()
        assert got["attention"].shape == (n,) and np.abs(got["attention"] - ref["attention"]).max() <= 1e-5
        if name in PER_CLASS:
            assert got[PER_CLASS_OUTPUT].shape == (C, n)
            assert np.abs(got[PER_CLASS_OUTPUT] - ref[PER_CLASS_OUTPUT]).max() <= 1e-5


@pytest.mark.parametrize("name", ["clam_mb", "transmil"])
def test_dynamo_export_parity(name: str, tmp_path: Path) -> None:
    """The exporter ``slidemil export`` tries first (the other heads' graphs are plain; these two hold the
    per-class selection and the Nyström and PPEG index arithmetic)."""
    bag_head, session = _onnx_session(_head(name), tmp_path / "head.onnx", exporter="dynamo")
    for n in (1, 50, 2000):
        x = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
        got = session.run(["probabilities", "attention"], {"features": x})
        with torch.no_grad():
            ref = bag_head(torch.from_numpy(x))
        assert np.abs(got[0] - ref[1].numpy()).max() <= 1e-5 and np.abs(got[1] - ref[2].numpy()).max() <= 1e-5


def test_a_50000_by_2560_bag_runs_through_every_head(tmp_path: Path) -> None:
    """Foundation-model width and a bag of 50,000 tiles: exported head on ONNX Runtime and torch forward
    (TransMIL's Nyström attention stays linear in N; peak memory is measured by bench/mil_heads.py --memory)."""
    x = np.random.default_rng(0).standard_normal((50_000, 2560), dtype=np.float32)
    for name in HEADS:
        torch.manual_seed(0)
        head = create_head(HeadConfig(mil_type=name, in_dim=2560, n_classes=2)).eval()
        bag_head, session = _onnx_session(head, tmp_path / f"{name}.onnx")
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"features": x})))
        with torch.no_grad():
            ref = bag_head(torch.from_numpy(x))
        assert got["attention"].shape == (50_000,) and np.isfinite(got["attention"]).all()
        assert np.abs(got["probabilities"] - ref[1].numpy()).max() <= 1e-4, name


def _bag_auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.parametrize("name", HEADS)
def test_each_head_learns_through_the_loop(name: str, tmp_path: Path) -> None:
    """Each head, trained by the trainer's loop with its default loss terms, separates bags whose positives
    hold 4 lesion tiles among 30-70 (32 slides, 20 epochs): the checkpoint it saves ranks the cohort's bags right."""
    from slidemil.artifacts.checkpoint import load_head
    from slidemil.slide.store import read_h5
    from slidemil.trainer.run import run_training
    from tests.trainer_fixtures import fast_config, make_feature_cohort

    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=32)
    cfg = fast_config(cohort, **{"optim.epochs": 20, "model.mil": name, "model.hidden_dim": 64,
                                 "model.landmarks": 32, "data.cache": True})
    (result,) = run_training(cfg, tmp_path / "run")
    head, meta = load_head(result.out / "checkpoint_best")
    assert meta["head_config"]["mil_type"] == name and type(head).__name__ == type(_head(name)).__name__
    labels = pd.read_csv(cohort / "metadata.csv").set_index("slide_id")["label"]
    scores = []
    with torch.no_grad():
        for sid in labels.index:
            bag = read_h5(cohort / "features" / f"{sid}.h5")
            scores.append(float(head(torch.from_numpy(bag.features)[None]).logits.softmax(-1)[0, 1]))
    auc = _bag_auc(np.array(scores), labels.to_numpy() == 1)
    assert auc >= 0.95, (name, auc, result.test_metrics)
