"""bench/model_selection.py replays the trainer's choice of epoch from recorded trajectories: its rules must
pick the epoch the trainer keeps, and judge it with the trainer's test figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from slidemil.trainer.run import run_training
from tests.bench_modules import bench_module
from tests.trainer_fixtures import fast_config, make_feature_cohort


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    with bench_module("model_selection") as module:
        yield module


@pytest.mark.parametrize("select, rule", [("best", "monitored"), ("last", "last epoch (--select last)")])
def test_replayed_rule_keeps_the_epoch_the_trainer_keeps(bench, tmp_path: Path, select: str,  # type: ignore[no-untyped-def]
                                                          rule: str) -> None:
    cohort = make_feature_cohort(tmp_path / "c", n_slides=24, shift=0.6)
    # a high learning rate: the validation loss jumps about, so the best epoch is not the last one
    cfg = fast_config(cohort, **{"optim.epochs": 8, "optim.select": select, "optim.patience": 2,
                                 "optim.monitor": "loss", "optim.lr": 2e-2, "data.max_patches": 20})
    (result,) = run_training(cfg, tmp_path / "run", callbacks=[bench._record_epoch])
    traj = pd.read_csv(tmp_path / "run" / "trajectory.csv", dtype={"slide_id": str})
    table = bench.epoch_table(traj)
    assert list(table.index) == list(pd.read_csv(tmp_path / "run" / "metrics.csv").epoch)
    pick = bench.monitored("val_loss", 2, ties=None) if rule == "monitored" else bench.RULES[rule]
    epoch = pick(table)
    assert epoch == result.best_epoch
    assert (epoch < table.index[-1]) == (select == "best")  # the two rules keep different epochs here
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert bench.judge(traj, epoch)["auc"] == pytest.approx(test["auc"], abs=1e-9)
    # the trajectory's validation figures are the trainer's
    logged = pd.read_csv(tmp_path / "run" / "metrics.csv").set_index("epoch")
    assert table.val_auc.to_numpy() == pytest.approx(logged.val_auc.to_numpy(), abs=1e-9)
    assert table.val_loss.to_numpy() == pytest.approx(logged.val_loss.to_numpy(), rel=1e-6)


def test_rules_on_a_hand_made_trajectory(bench) -> None:  # type: ignore[no-untyped-def]
    # validation AUC saturates at epoch 1 by chance; the loss is lowest there too
    table = pd.DataFrame({"val_auc": [1.0, 0.8, 0.9, 1.0, 1.0, 0.95], "val_loss": [0.6, 0.9, 0.8, 0.7, 0.65, 0.7]},
                         index=pd.Index(range(1, 7), name="epoch"))
    assert bench.monitored("val_auc", 2)(table) == 1  # stops after epochs 2 and 3 fail to beat 1.0
    assert bench.monitored("val_auc", 0)(table) == 1  # ties at 1.0 go to the lower loss: epoch 1 (0.6)
    assert bench.monitored("val_auc", 0, min_epoch=3)(table) == 5
    assert bench.monitored("val_loss", 0, ties=None)(table) == 1
    assert bench.RULES["last epoch (--select last)"](table) == 6
