"""The operating point: chosen on the validation slides, recorded in the checkpoint and the test outputs,
carried into the package manifest (the engine's use of it: tests/test_engine_heads.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidemil.evaluation.operating_point import balanced_accuracy_at, choose_operating_point, predict_index
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_threshold_is_the_logit_midpoint_of_the_best_interval() -> None:
    # an under-confident head: every positive below 0.5, still perfectly ranked
    pos, neg = [0.30, 0.35, 0.45], [0.02, 0.05, 0.10]
    probs = np.array([[1 - p, p] for p in pos + neg])
    labels = np.array([1, 1, 1, 0, 0, 0])
    op = choose_operating_point(labels, probs, ["normal", "tumour"])
    assert op is not None and op["class"] == "tumour" and op["class_index"] == 1
    expected = 1 / (1 + math.exp(-(_logit(0.10) + _logit(0.30)) / 2))
    assert op["threshold"] == pytest.approx(expected)
    assert op["val_balanced_accuracy"] == 1.0 and op["val_balanced_accuracy_argmax"] == 0.5
    assert "6 slides" in op["chosen_on"]
    assert (predict_index(probs, op) == labels).all()
    assert (predict_index(probs, None) == 0).all()  # argmax calls every slide normal


def test_argmax_stays_where_the_validation_slides_give_no_better_cut() -> None:
    # separated at 0.5 already: the gap (0.2, 0.9) is no evidence for another threshold
    pos, neg = [0.90, 0.95, 0.99], [0.01, 0.10, 0.20]
    probs = np.array([[1 - p, p] for p in pos + neg])
    op = choose_operating_point(np.array([1, 1, 1, 0, 0, 0]), probs, ["normal", "tumour"])
    assert op is not None and op["threshold"] == 0.5
    assert op["val_balanced_accuracy"] == op["val_balanced_accuracy_argmax"] == 1.0
    # one positive below 0.5: a better cut exists, but one slide is no evidence for it (the gain, 1/6, is below
    # what two slides of a class of three are worth, 1/3)
    pos = [0.40, 0.95, 0.99]
    probs = np.array([[1 - p, p] for p in pos + neg])
    op = choose_operating_point(np.array([1, 1, 1, 0, 0, 0]), probs, ["normal", "tumour"])
    assert op is not None and op["threshold"] == 0.5 and op["min_gain"] == pytest.approx(1 / 3)
    assert op["val_balanced_accuracy"] == 1.0 and op["val_balanced_accuracy_argmax"] == pytest.approx(5 / 6)
    # two positives below 0.5: the threshold moves to the logit midpoint of the best cut
    pos = [0.40, 0.45, 0.99]
    probs = np.array([[1 - p, p] for p in pos + neg])
    op = choose_operating_point(np.array([1, 1, 1, 0, 0, 0]), probs, ["normal", "tumour"])
    assert op is not None and op["threshold"] == pytest.approx(1 / (1 + math.exp(-(_logit(0.20) + _logit(0.40)) / 2)))


def test_overlapping_scores_take_the_best_cut() -> None:
    # three positives below 0.5, one negative among them: the best cut gains two slides' worth over argmax
    scores = np.array([0.9, 0.45, 0.4, 0.35, 0.42, 0.2, 0.1, 0.05])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    op = choose_operating_point(labels, np.stack([1 - scores, scores], 1), ["a", "b"])
    assert op is not None and op["threshold"] < 0.5
    best = max(balanced_accuracy_at(scores, labels == 1, t) for t in np.linspace(0, 1, 1001))
    assert op["val_balanced_accuracy"] == pytest.approx(best) == 0.875
    assert balanced_accuracy_at(scores, labels == 1, op["threshold"]) == pytest.approx(best)
    # overlap that a better cut would fix by one slide only: argmax stays
    scores = np.array([0.9, 0.6, 0.4, 0.55, 0.2, 0.1])
    op = choose_operating_point(labels[[0, 1, 2, 4, 5, 6]], np.stack([1 - scores, scores], 1), ["a", "b"])
    assert op is not None and op["threshold"] == 0.5


def test_nothing_to_choose_from_one_class() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert choose_operating_point(np.array([1, 1]), probs, ["a", "b"]) is None


def test_predict_index_one_against_the_rest() -> None:
    op = {"class_index": 2, "threshold": 0.2}
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.1, 0.6, 0.3]])
    assert predict_index(probs, op).tolist() == [2, 0, 2]
    assert int(predict_index(probs[1], op)) == 0


def test_training_records_the_operating_point(tmp_path: Path) -> None:
    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=24)
    (result,) = run_training(fast_config(cohort, **{"optim.epochs": 3, "data.max_patches": 20}), tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "checkpoint_best.json").read_text())
    op = meta["operating_point"]
    assert op["class_index"] == 1 and 0.0 < op["threshold"] < 1.0 and "validation" in op["chosen_on"]
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test["threshold"] == op["threshold"] and test["operating_point"]["threshold"] == op["threshold"]
    preds = pd.read_csv(tmp_path / "run" / "test_predictions.csv")
    expected = np.where(preds["prob_1"] >= op["threshold"], 1, 0)
    assert (preds["pred_at_threshold"] == expected).all()
    assert test["balanced_accuracy_at_threshold"] == pytest.approx(
        balanced_accuracy_at(preds["prob_1"].to_numpy(), preds["label"].to_numpy() == 1, op["threshold"]))
    # resuming a finished run chooses the same threshold again
    (again,) = run_training(fast_config(cohort, **{"optim.epochs": 3, "data.max_patches": 20}), tmp_path / "run",
                            resume=True)
    assert json.loads((tmp_path / "run" / "checkpoint_best.json").read_text())["operating_point"] == op


def test_multi_class_runs_keep_argmax(tmp_path: Path) -> None:
    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=18, n_classes=3)
    run_training(fast_config(cohort, **{"optim.epochs": 1, "data.max_patches": 20}), tmp_path / "run")
    assert "operating_point" not in json.loads((tmp_path / "run" / "checkpoint_best.json").read_text())
    assert "threshold" not in json.loads((tmp_path / "run" / "test_metrics.json").read_text())
