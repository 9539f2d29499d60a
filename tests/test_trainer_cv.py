"""k-fold cross-validation: patient grouping in every fold, fold folders, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidemil.cli import main
from slidemil.trainer.cv import cv_summary
from slidemil.trainer.run import run_training
from slidemil.trainer.splits import load_splits
from tests.trainer_fixtures import assert_same_metrics, fast_config, make_feature_cohort

K = 3


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cv")
    cohort = make_feature_cohort(root / "cohort", n_slides=24, slides_per_patient=2)
    run_training(fast_config(cohort, **{"cv.folds": K, "optim.epochs": 2}), root / "run")
    return cohort, root / "run"


def test_patients_never_cross_parts_in_any_fold(cv_run: tuple[Path, Path]) -> None:
    cohort, out = cv_run
    table = pd.read_csv(cohort / "metadata.csv", dtype={"slide_id": str}).set_index("slide_id")
    folds = load_splits(out / "splits.csv")
    assert isinstance(folds, list) and len(folds) == K
    tested = pd.concat([f[f == "test"] for f in folds]).index
    assert sorted(tested) == sorted(table.index)  # every slide is tested exactly once
    for i, split in enumerate(folds):
        parts = table.loc[split.index].assign(split=split)
        assert (parts.groupby("patient_id")["split"].nunique() == 1).all(), f"fold {i} splits a patient"
        assert set(split) == {"train", "val", "test"}
        own = load_splits(out / f"fold_{i}" / "splits.csv")
        assert own.sort_index().equals(split.sort_index())


def test_fold_folders_and_summary(cv_run: tuple[Path, Path]) -> None:
    _, out = cv_run
    per_fold = [json.loads((out / f"fold_{i}" / "test_metrics.json").read_text()) for i in range(K)]
    for i in range(K):
        assert (out / f"fold_{i}" / "checkpoint_best.safetensors").is_file()
        assert (out / f"fold_{i}" / "backbone" / "backbone_card.json").is_file()
    summary = pd.read_csv(out / "cv_summary.csv").set_index("metric")
    auc = [m["auc"] for m in per_fold]
    assert summary.loc["auc", "mean"] == pytest.approx(np.mean(auc))
    assert summary.loc["auc", "std"] == pytest.approx(np.std(auc, ddof=1))
    assert summary.loc["auc", "n_folds"] == K and list(summary.columns[-K:]) == [f"fold_{i}" for i in range(K)]
    assert {"balanced_accuracy", "loss", "acc_1", "f1_0", "ece"} <= set(summary.index)
    assert cv_summary(out).equals(pd.read_csv(out / "cv_summary.csv"))


def test_single_fold_and_summary_command(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, out = cv_run
    args = ["train", "--metadata", str(cohort / "metadata.csv"), "--features", str(cohort), "--out",
            str(tmp_path), "--folds", str(K), "--fold", "1", "--epochs", "2"]
    assert main(args) == 0
    assert [p.name for p in tmp_path.glob("fold_*")] == ["fold_1"]
    assert not (tmp_path / "cv_summary.csv").exists()
    same = json.loads((tmp_path / "fold_1" / "test_metrics.json").read_text())
    assert_same_metrics(same, json.loads((out / "fold_1" / "test_metrics.json").read_text()))
    assert main(["cv-summary", "--out", str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "cv_summary.csv")["n_folds"].eq(1).all()
    assert main(["cv-summary", "--out", str(tmp_path / "nothing")]) == 2

