"""Several initialisations (``--inits K``): the ensemble head, how it combines its members, that each member
learns exactly as it would alone, which one the run keeps (``--init-choice``), and that an averaged ensemble
goes through checkpoint, export and ONNX Runtime as one head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.errors import ConfigError
from slidemil.models.ensemble import EnsembleHead
from slidemil.models.mil import HeadConfig, MILHead, create_head

D, C = 24, 3


def _ensemble(name: str, k: int = 3, seed: int = 0, **kw: object) -> MILHead:
    torch.manual_seed(seed)
    return create_head(HeadConfig(mil_type=name, in_dim=D, n_classes=C, hidden_dim=32, attention_dim=16, n_heads=4,
                                  landmarks=16, ensemble=k, **kw)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["gated", "clam_mb"])
def test_the_ensemble_is_the_geometric_mean_of_its_members(name: str) -> None:
    head = _ensemble(name)
    assert isinstance(head, EnsembleHead) and len(head.members) == 3
    assert head.per_class_attention == (name == "clam_mb")
    w = [m.state_dict()[m.input_layer + ".weight"] for m in head.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # each member from its own initialisation
    features = torch.randn(2, 40, D)
    with torch.no_grad():
        out = head(features)
        members = [m(features) for m in head.members]
    log_p = torch.stack([torch.log_softmax(o.logits, -1) for o in members])
    torch.testing.assert_close(out.logits, log_p.mean(0))
    expected_p = log_p.exp().prod(0) ** (1 / 3)
    torch.testing.assert_close(out.logits.softmax(-1), expected_p / expected_p.sum(-1, keepdim=True))
    assert out.member_logits is not None and out.member_logits.shape == (3, 2, C)
    torch.testing.assert_close(torch.softmax(out.attention_raw, -1), out.attention)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2))
    if name == "clam_mb":
        per_class = torch.stack([o.attention_per_class for o in members]).mean(0)  # type: ignore[misc]
        torch.testing.assert_close(out.attention_per_class, per_class)
        torch.testing.assert_close(out.attention, per_class[torch.arange(2), out.logits.argmax(-1)])
    else:
        torch.testing.assert_close(out.attention, torch.stack([o.attention for o in members]).mean(0))
    head.temperature.fill_(2.0)  # calibration divides the ensemble's logits, not the members'
    with torch.no_grad():
        torch.testing.assert_close(head(features).logits, log_p.mean(0) / 2)


def test_padding_and_auxiliary_terms() -> None:
    head = _ensemble("gated", dropout=0.0)
    features = torch.randn(2, 13, D)
    features[1, 5:] = float("nan")
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        batched = head(features, mask)
        alone = head(features[1:, :5])
    torch.testing.assert_close(batched.logits[1], alone.logits[0], rtol=1e-5, atol=1e-6)
    assert torch.all(batched.attention[1, 5:] == 0) and torch.all(batched.attention_raw[1, 5:] == float("-inf"))
    head.train()
    head.keep_for_loss = True
    assert all(m.keep_for_loss for m in head.members)
    labels = torch.tensor([1, 2])
    head(features, mask)
    aux = head.auxiliary_loss(labels)
    head.eval()
    for m in head.members:  # the members' own terms, summed
        m.train()
        m(features, mask)
    expected = sum(m.auxiliary_loss(labels) for m in head.members)  # type: ignore[misc]
    assert aux is not None and float(aux.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_settings_and_records() -> None:
    cfg = HeadConfig(mil_type="dsmil", in_dim=D, n_classes=2, ensemble=4)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    old = {"mil_type": "gated", "in_dim": D, "n_classes": 2, "hidden_dim": 256, "attention_dim": 128, "dropout": 0.25}
    assert HeadConfig.from_dict(old).ensemble == 1  # records written before ensembles load as one head
    with pytest.raises(ConfigError, match="ensemble"):
        HeadConfig(mil_type="gated", in_dim=D, ensemble=0)
    from slidemil.config import load_config
    from slidemil.trainer.config import TrainConfig
    with pytest.raises(ConfigError, match="inits"):
        load_config(TrainConfig, None, {"model.inits": 0})
    with pytest.raises(ConfigError, match="init_choice"):
        load_config(TrainConfig, None, {"model.init_choice": "best_auc"})


def test_each_member_learns_exactly_as_it_would_alone(tmp_path: Path) -> None:
    """Trained through the loop (standardisation, max-instance term, clipping, cosine schedule), member 0 of a
    3-head ensemble ends bit for bit where a single head of the same seed does (dropout off: its draws are
    the only thing the members share a generator for); the logged training loss is the members' mean."""
    from slidemil.artifacts.checkpoint import load_head
    from slidemil.trainer.run import run_training
    from tests.trainer_fixtures import fast_config, make_feature_cohort

    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=16)
    runs = {}
    for k in (1, 3):
        cfg = fast_config(cohort, **{"optim.epochs": 3, "model.dropout": 0.0, "model.hidden_dim": 32,
                                     "model.inits": k, "model.init_choice": "average",
                                     "optim.grad_clip": 0.05})  # clipping on every step
        (runs[k],) = run_training(cfg, tmp_path / f"k{k}")
    single, _ = load_head(runs[1].out / "checkpoint_best")
    ensemble, meta = load_head(runs[3].out / "checkpoint_best")
    assert isinstance(ensemble, EnsembleHead) and meta["head_config"]["ensemble"] == 3
    member = ensemble.members[0].state_dict()
    for key, value in single.state_dict().items():
        assert torch.equal(value, member[key]), key
    logs = {k: pd.read_csv(r.out / "metrics.csv") for k, r in runs.items()}
    first = logs[1]["train_loss"].iloc[0]  # epoch 1: the members' mean is near the single head's; their sum is 3x
    assert 0.5 * first < logs[3]["train_loss"].iloc[0] < 2 * first


@pytest.mark.parametrize("name, k", [("gated", 5), ("clam_mb", 2)])
def test_onnx_export_and_runtime_parity(name: str, k: int, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from slidemil.models.mil import BagHead
    from slidemil.models.onnx import export_head

    head = _ensemble(name, k)
    bag_head = BagHead(head)
    export_head(bag_head, tmp_path / "head.onnx", D, exporter="legacy")
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert tuple(names) == bag_head.output_names
    for n in (1, 7, 3000):
        x = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
        got = dict(zip(names, session.run(None, {"features": x})))
        with torch.no_grad():
            ref = {key: t.numpy() for key, t in zip(names, bag_head(torch.from_numpy(x)))}
        for key in ("probabilities", "attention", *(["attention_per_class"] if name == "clam_mb" else [])):
            assert np.abs(got[key] - ref[key]).max() <= 1e-5, (key, n)


def test_the_package_records_the_ensemble(tmp_path: Path) -> None:
    from slidemil.artifacts.package import MANIFEST_FILE, load_package, load_torch_models
    from slidemil.engine.head_only import open_head
    from tests.test_engine_heads import _package

    model = _package(tmp_path, "gated", ["normal", "tumour"], ensemble=3)
    manifest = json.loads((model / MANIFEST_FILE).read_text())
    assert manifest["mil"]["ensemble"] == 3 and load_package(model).head_config.ensemble == 3
    with open_head(model) as head:
        x = np.random.default_rng(0).standard_normal((50, head.in_dim)).astype(np.float32)
        out = head.runner.infer({"features": x})
    _, torch_head = load_torch_models(load_package(model))
    assert isinstance(torch_head.head, EnsembleHead)
    with torch.no_grad():
        ref = torch_head(torch.from_numpy(x))
    assert np.abs(out["probabilities"] - ref[1].numpy()).max() <= 1e-5
    assert np.abs(out["attention"] - ref[2].numpy()).max() <= 1e-5


def _member_val_losses(ensemble: EnsembleHead, cohort: Path, run: Path) -> np.ndarray:
    """Each member's mean cross-entropy over the run's validation slides, computed here from the feature files."""
    from slidemil.slide.store import read_h5

    split = pd.read_csv(run / "splits.csv").set_index("slide_id")["split"]
    labels = pd.read_csv(cohort / "metadata.csv").set_index("slide_id")["label"]
    losses = []
    with torch.no_grad():
        for sid in split.index[split == "val"]:
            x = torch.from_numpy(read_h5(cohort / "features" / f"{sid}.h5").features)[None]
            y = torch.tensor([int(labels[sid])])
            losses.append([float(torch.nn.functional.cross_entropy(m(x).logits, y)) for m in ensemble.members])
    return np.mean(losses, axis=0)


def test_the_run_keeps_the_initialisation_with_the_lowest_validation_loss(tmp_path: Path) -> None:
    """``--inits 3`` (with the default ``--slide-contrast auto``: three plain and three contrast heads): the kept
    checkpoint is the one head of six whose validation loss is lowest (recomputed here from the features), as a
    single head that exports like any other; the kept epoch's weights of all six stay in ``checkpoint_inits``; a resumed, finished run chooses the same head; ``--init-choice average`` keeps all."""
    from slidemil.artifacts.checkpoint import load_head, read_checkpoint_meta
    from slidemil.trainer.run import run_training
    from tests.trainer_fixtures import fast_config, make_feature_cohort

    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=20, shift=0.6)
    cfg = fast_config(cohort, **{"optim.epochs": 4, "model.hidden_dim": 32, "model.inits": 3})
    (result,) = run_training(cfg, tmp_path / "run")
    kept, meta = load_head(result.out / "checkpoint_best")
    every, _ = load_head(result.out / "checkpoint_inits")
    assert not isinstance(kept, EnsembleHead) and meta["head_config"]["ensemble"] == 1
    assert isinstance(every, EnsembleHead) and len(every.members) == 6
    record = meta["inits"]
    losses = _member_val_losses(every, cohort, result.out)
    assert record["val_loss"] == pytest.approx(losses.tolist(), rel=1e-4)
    assert record["kept"] == int(losses.argmin()) and len(set(np.round(losses, 4))) == 6  # a real choice
    assert record["slide_contrast"] == [False] * 3 + [True] * 3
    assert [m.contrast for m in every.members] == record["slide_contrast"]  # type: ignore[attr-defined]
    for key, value in kept.state_dict().items():
        assert torch.equal(value, every.members[record["kept"]].state_dict()[key]), key
    assert "operating_point" in meta  # chosen after, on the kept head
    kept_val = pd.read_csv(result.out / "val_predictions.csv")  # written by the test step, from the kept head
    from slidemil.evaluation.metrics import compute_metrics
    expected = compute_metrics(kept_val["label"].to_numpy(), kept_val[["prob_0", "prob_1"]].to_numpy(), ["0", "1"])
    assert meta["metrics"]["auc"] == pytest.approx(expected["auc"])  # the kept head's figures, not the average's
    (again,) = run_training(cfg, tmp_path / "run", resume=True)
    assert read_checkpoint_meta(again.out / "checkpoint_best")["inits"] == record
    assert again.test_metrics["auc"] == pytest.approx(result.test_metrics["auc"])

    averaged = fast_config(cohort, **{"optim.epochs": 4, "model.hidden_dim": 32, "model.inits": 3,
                                      "model.init_choice": "average"})
    (result,) = run_training(averaged, tmp_path / "average")
    head, meta = load_head(result.out / "checkpoint_best")
    assert isinstance(head, EnsembleHead) and "inits" not in meta
    assert not (result.out / "checkpoint_inits.json").exists()
