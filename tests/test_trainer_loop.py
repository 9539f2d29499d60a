"""The training loop on hand-made feature bags: learning, outputs, options, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from slidemil.artifacts.checkpoint import load_head, load_training_state, read_checkpoint_meta
from slidemil.cli import main
from slidemil.errors import ConfigError
from slidemil.trainer.loop import EpochResult, Trainer
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import assert_same_metrics, fast_config, make_feature_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_feature_cohort(tmp_path_factory.mktemp("cohort"), n_slides=40)


def test_default_settings_learn(cohort: Path, tmp_path: Path) -> None:
    (result,) = run_training(fast_config(cohort, **{"log.tensorboard": True}), tmp_path)
    assert result.val_metrics["auc"] >= 0.95 and result.test_metrics["auc"] >= 0.95
    assert result.test_metrics["balanced_accuracy"] >= 0.8
    expected = {"metrics.csv", "tensorboard", "test_metrics.json", "test_predictions.csv", "splits.csv",
                "train_config.json", "backbone", "checkpoint_best.safetensors", "checkpoint_best.json",
                "checkpoint_last.safetensors", "checkpoint_last.json", "checkpoint_last.state.safetensors",
                "checkpoint_last.state.json", "checkpoint_inits.safetensors", "checkpoint_inits.json"}
    assert expected <= {p.name for p in tmp_path.iterdir()}
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns[:2]) == ["epoch", "train_loss"] and list(metrics.columns[-3:]) == [
        "lr", "seconds", "bags_per_s"]
    assert {"val_auc", "val_balanced_accuracy", "val_loss", "val_acc_1"} <= set(metrics.columns)
    preds = pd.read_csv(tmp_path / "test_predictions.csv", dtype={"slide_id": str})
    assert list(preds.columns[:6]) == ["slide_id", "label", "pred", "prob_0", "prob_1", "split"]
    assert set(preds["split"]) == {"test"} and len(preds) == result.test_metrics["n"]
    meta = read_checkpoint_meta(tmp_path / "checkpoint_best")
    assert meta["epoch"] == result.best_epoch and meta["backbone_weights"] == "backbone/"
    assert meta["tiling"]["tile"]["patch_size"] == 256 and meta["mode"] == "features"
    assert json.loads((tmp_path / "test_metrics.json").read_text())["best_epoch"] == result.best_epoch
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "backbone" / "backbone.safetensors").is_file()


def test_best_checkpoint_reproduces_test_predictions(cohort: Path, tmp_path: Path) -> None:
    run_training(fast_config(cohort, **{"optim.epochs": 3}), tmp_path)
    head, meta = load_head(tmp_path / "checkpoint_best.safetensors")
    preds = pd.read_csv(tmp_path / "test_predictions.csv", dtype={"slide_id": str})
    from slidemil.slide.store import read_h5
    row = preds.iloc[0]
    feats = torch.from_numpy(read_h5(cohort / "features" / f"{row.slide_id}.h5").features)
    probs = torch.softmax(head(feats[None]).logits[0], -1)
    assert probs[1].item() == pytest.approx(row.prob_1, abs=1e-6)


class Killed(Exception):
    pass


def test_resume_continues_exactly(cohort: Path, tmp_path: Path) -> None:
    cfg = fast_config(cohort, **{"optim.epochs": 6, "data.max_patches": 20, "data.batch_size": 2})
    run_training(cfg, tmp_path / "full")

    def kill_after_3(trainer: Trainer, result: EpochResult) -> None:
        if result.epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, tmp_path / "part", callbacks=[kill_after_3])
    assert read_checkpoint_meta(tmp_path / "part" / "checkpoint_last")["epoch"] == 3
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg, tmp_path / "part")
    run_training(cfg, tmp_path / "part", resume=True)
    for name in ("checkpoint_last.safetensors", "checkpoint_best.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "part" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    full, part = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("full", "part"))
    assert list(part["epoch"]) == list(range(1, 7))
    cols = [c for c in full.columns if c not in ("seconds", "bags_per_s")]
    pd.testing.assert_frame_equal(full[cols], part[cols], rtol=1e-6)
    assert_same_metrics(json.loads((tmp_path / "full" / "test_metrics.json").read_text()),
                        json.loads((tmp_path / "part" / "test_metrics.json").read_text()))
    # a finished run resumed again only re-evaluates
    (result,) = run_training(cfg, tmp_path / "part", resume=True)
    assert len(pd.read_csv(tmp_path / "part" / "metrics.csv")) == 6 and result.test_metrics


@pytest.mark.parametrize("changes", [
    {"loss.class_weights": True, "loss.name": "focal", "loss.focal_gamma": 1.0, "optim.scheduler": "plateau",
     "optim.monitor": "loss"},
    {"loss.weighted_sampling": True, "loss.label_smoothing": 0.1, "model.mil": "simple", "optim.scheduler": "none",
     "data.batch_size": 3, "data.max_patches": None, "optim.warmup_epochs": 0},
    {"data.cache": True, "data.workers": 1, "optim.monitor": "balanced_accuracy", "optim.grad_clip": 0.0},
])
def test_options_run(cohort: Path, tmp_path: Path, changes: dict) -> None:  # type: ignore[type-arg]
    (result,) = run_training(fast_config(cohort, **{"optim.epochs": 2, **changes}), tmp_path)
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2 and result.test_metrics["n"] > 0
    saved = json.loads((tmp_path / "train_config.json").read_text())["config"]
    assert saved["optim"]["epochs"] == 2


def test_gradient_accumulation_equals_a_larger_batch(cohort: Path, tmp_path: Path) -> None:
    settings = {"optim.epochs": 2, "data.max_patches": 20, "model.dropout": 0.0}
    run_training(fast_config(cohort, **settings, **{"data.batch_size": 2}), tmp_path / "batch")
    run_training(fast_config(cohort, **settings, **{"optim.accumulate": 2}), tmp_path / "accumulated")
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("batch", "accumulated"))
    cols = [c for c in a.columns if c not in ("seconds", "bags_per_s")]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-4, atol=1e-6)
    x, y = (load_file(tmp_path / d / "checkpoint_last.safetensors") for d in ("batch", "accumulated"))
    for key in x:
        # the attention score bias (of each initialisation's head) has no true gradient (the softmax ignores
        # a shift); Adam turns its rounding noise into full-size steps, which change nothing downstream
        if not key.endswith("attention_w.bias"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-5)


def test_early_stopping_when_the_validation_loss_never_improves(tmp_path: Path) -> None:
    root = make_feature_cohort(tmp_path / "c", n_slides=30, n_classes=3, slides_per_patient=1)
    # a learning rate too small to move float32 weights: the validation loss never improves
    cfg = fast_config(root, **{"optim.epochs": 30, "optim.select": "best", "optim.patience": 2,
                               "optim.monitor": "loss", "optim.lr": 1e-12, "optim.scheduler": "none",
                               "model.dropout": 0.0})
    (result,) = run_training(cfg, tmp_path / "run")
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 3 and result.best_epoch == 1
    # the metrics of a model that learnt nothing are still computed, over all three classes
    assert len(result.test_metrics["confusion_matrix"]) == 3


def test_the_run_keeps_the_last_epoch_unless_told_to_select_the_best(cohort: Path, tmp_path: Path) -> None:
    settings = {"optim.epochs": 6, "optim.patience": 1, "optim.monitor": "loss", "data.max_patches": 20}
    # default (select: last): every epoch runs, patience is not early stopping, the final weights are kept
    (last,) = run_training(fast_config(cohort, **settings), tmp_path / "last")
    assert len(pd.read_csv(tmp_path / "last" / "metrics.csv")) == 6 and last.best_epoch == 6
    # checkpoint_inits: the kept epoch's weights of every initialisation (checkpoint_best is the one chosen of them)
    kept, final = (load_file(tmp_path / "last" / f"{n}.safetensors") for n in ("checkpoint_inits", "checkpoint_last"))
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    assert read_checkpoint_meta(tmp_path / "last" / "checkpoint_best")["epoch"] == 6
    # select: best keeps the epoch of the lowest validation loss and stops one epoch after it stops improving
    (best,) = run_training(fast_config(cohort, **settings, **{"optim.select": "best"}), tmp_path / "best")
    metrics = pd.read_csv(tmp_path / "best" / "metrics.csv")
    want = int(metrics.loc[metrics.val_loss.idxmin(), "epoch"])
    assert best.best_epoch == want and read_checkpoint_meta(tmp_path / "best" / "checkpoint_best")["epoch"] == want
    assert len(metrics) == min(want + 1, 6)
    # both runs trained the same weights epoch by epoch: their logs agree where both ran
    same = pd.read_csv(tmp_path / "last" / "metrics.csv").iloc[:len(metrics)]
    assert same.val_loss.to_numpy() == pytest.approx(metrics.val_loss.to_numpy(), rel=1e-6)


def test_multiclass_learns(tmp_path: Path) -> None:
    # three classes: 0 has no lesion; 1 and 2 each have a few lesion tiles, shifted along their own direction
    root = make_feature_cohort(tmp_path / "c", n_slides=60, n_classes=3, slides_per_patient=1, n_lesion=6,
                               shift=2.0)
    (result,) = run_training(fast_config(root, **{"optim.epochs": 10}), tmp_path / "run")
    val, test = result.val_metrics, result.test_metrics
    # chance is an AUC of 0.5 and a balanced accuracy of 1/3; a model that merges classes 1 and 2
    # (a binary task in disguise) stays at 2/3
    assert val["auc"] >= 0.9 and test["auc"] >= 0.9, (val["auc"], test["auc"])
    assert test["balanced_accuracy"] >= 0.8 and val["balanced_accuracy"] >= 0.8, test["confusion_matrix"]
    cm = test["confusion_matrix"]
    assert len(cm) == 3 and all(len(row) == 3 for row in cm) and sum(map(sum, cm)) == test["n"]
    assert all(row[c] >= 0.75 * sum(row) for c, row in enumerate(cm)), cm
    for c in range(3):
        assert {f"acc_{c}", f"precision_{c}", f"recall_{c}", f"f1_{c}"} <= set(test)
        assert test[f"recall_{c}"] >= 0.75, (c, test[f"recall_{c}"])
    preds = pd.read_csv(tmp_path / "run" / "test_predictions.csv", dtype={"slide_id": str})
    assert list(preds.columns[:6]) == ["slide_id", "label", "pred", "prob_0", "prob_1", "prob_2"]
    assert set(preds["pred"]) == {0, 1, 2} and len(preds) == test["n"]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"val_acc_0", "val_acc_1", "val_acc_2"} <= set(metrics.columns)
    assert metrics["train_loss"].iloc[-1] < 0.5 * metrics["train_loss"].iloc[0]  # from about ln 3


def _plateau_run(tmp_path: Path, cohort: Path, lr: float) -> pd.DataFrame:
    cfg = fast_config(cohort, **{"optim.epochs": 6, "optim.scheduler": "plateau", "optim.monitor": "loss",
                                 "optim.plateau_patience": 2, "optim.plateau_factor": 0.5, "optim.warmup_epochs": 0,
                                 "optim.patience": 0, "optim.lr": lr, "model.dropout": 0.0})
    run_training(cfg, tmp_path)
    return pd.read_csv(tmp_path / "metrics.csv")


def test_plateau_schedule_cuts_the_lr_when_validation_loss_stalls(cohort: Path, tmp_path: Path) -> None:
    # lr 1e-12 moves no float32 weight: the validation loss is the same every epoch, so with patience 2
    # the lr is halved after epochs 3 and 5 (the lr column is the lr after the epoch's validation)
    flat = _plateau_run(tmp_path / "flat", cohort, 1e-12)
    assert flat["val_loss"].nunique() == 1
    assert flat["lr"].to_numpy() / 1e-12 == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    schedule = load_training_state(tmp_path / "flat" / "checkpoint_last")["schedule"]
    assert schedule["scale"] == pytest.approx(0.25) and schedule["bad_epochs"] == 1  # saved for --resume
    # with a learning rate that learns, the validation loss improves every epoch and the lr stays put
    learning = _plateau_run(tmp_path / "learning", cohort, 5e-4)
    assert (learning["val_loss"].diff().dropna() < 0).all(), learning["val_loss"].tolist()
    assert (learning["lr"] == 5e-4).all(), learning["lr"].tolist()


@pytest.mark.parametrize("monitor, values, cut_after", [
    # improving loss: never cut; then two epochs without a better value: cut; a better value resets the count
    ("loss", [1.0, 0.9, 0.8, 0.7, 0.7, 0.75, 0.6, 0.65, 0.6, 0.61, 0.62], [6, 9, 11]),
    ("auc", [0.5, 0.6, 0.7, 0.7, 0.7, 0.8, 0.8, 0.9], [5]),
])
def test_plateau_schedule_follows_the_monitored_metric(monitor: str, values: list, cut_after: list) -> None:
    from slidemil.trainer.config import OptimConfig
    from slidemil.trainer.schedule import LRSchedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = OptimConfig(lr=0.1, scheduler="plateau", warmup_epochs=0, epochs=len(values), monitor=monitor,
                      plateau_patience=2, plateau_factor=0.5)
    schedule = LRSchedule(opt, cfg, steps_per_epoch=3, monitor=monitor)
    expected, lrs = 0.1, []
    for epoch, value in enumerate(values, start=1):
        for _ in range(3):
            schedule.step()
        assert schedule.lr == pytest.approx(expected), f"the lr changed during epoch {epoch}"
        schedule.epoch_end(value)
        if epoch in cut_after:
            expected *= 0.5
        lrs.append(schedule.lr)
        assert schedule.lr == pytest.approx(expected), (epoch, lrs)
        assert opt.param_groups[0]["lr"] == schedule.lr


def test_cli_train_and_errors(cohort: Path, tmp_path: Path) -> None:
    yaml = tmp_path / "train.yaml"
    yaml.write_text("optim:\n  epochs: 5\n  lr: 0.001\nmodel:\n  mil: simple\n")
    args = ["train", "--metadata", str(cohort / "metadata.csv"), "--features", str(cohort), "--out",
            str(tmp_path / "run"), "--epochs", "2", "--max-patches", "0", "--hidden-dim", "32", "--class-names",
            "normal,tumour", "--seed", "3", "--no-standardize", "--config", str(yaml)]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["config"]["data"]["max_patches"] is None and saved["config"]["model"]["hidden_dim"] == 32
    assert saved["config"]["optim"]["epochs"] == 2 and saved["config"]["optim"]["lr"] == 0.001
    assert saved["config"]["model"]["mil"] == "simple" and saved["config"]["model"]["standardize"] is False
    assert saved["class_names"] == ["normal", "tumour"]
    assert "prob_tumour" in pd.read_csv(tmp_path / "run" / "test_predictions.csv").columns
    assert main(args) == 2  # the folder holds a run and --resume was not given
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"slide_id": ["x", "x"], "label": [0, 1]}).to_csv(bad, index=False)
    assert main([*args[:2], str(bad), *args[3:6], str(tmp_path / "other")]) == 2


def test_wandb_sink_logs_epochs_and_is_optional(cohort: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}  # type: ignore[type-arg]

    class Run:
        def log(self, scalars: dict, step: int) -> None:  # type: ignore[type-arg]
            calls["log"].append((step, scalars))

        def finish(self) -> None:
            calls["finish"].append(True)

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run(),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = fast_config(cohort, **{"optim.epochs": 2, "log.wandb": True, "log.run_name": "r1"})
    run_training(cfg, tmp_path / "run")
    assert calls["init"][0]["name"] == "r1" and calls["init"][0]["id"] == "abc123"
    assert [step for step, _ in calls["log"][:2]] == [1, 2] and "val/auc" in calls["log"][0][1]
    assert any("test/auc" in s for _, s in calls["log"]) and calls["finish"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="pip install"):
        run_training(cfg, tmp_path / "other")


def test_sigterm_waits_for_the_checkpoint(tmp_path: Path) -> None:
    import os
    import signal

    from slidemil.artifacts.checkpoint import deferred_termination

    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with deferred_termination():
            os.kill(os.getpid(), signal.SIGTERM)
            assert not got  # held while the files are written
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
