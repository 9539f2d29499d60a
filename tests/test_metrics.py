"""Metrics against hand-computed values and sklearn."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from slidemil.errors import ConfigError, LabelTableError
from slidemil.evaluation.metrics import (
    MONITOR_MODES,
    compute_metrics,
    flat_metrics,
    is_better,
    monitor_mode,
    weighted_scalar_metrics,
)

# Six slides, binary. p1 = probability of class 1; predictions threshold at 0.5 (argmax).
Y6 = np.array([0, 0, 0, 1, 1, 1])
P1 = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])
PROBS6 = np.c_[1 - P1, P1]


def test_binary_six_slides_by_hand():
    m = compute_metrics(Y6, PROBS6, ["neg", "pos"], loss=0.5)
    # predicted: 0 0 1 0 1 1 -> confusion [[2, 1], [1, 2]], 4 of 6 right.
    assert m["n"] == 6 and m["loss"] == 0.5
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall 2/3 for both classes -> balanced accuracy 2/3; precision 2/3 each -> F1 2/3 each.
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["acc_neg"] == m["recall_neg"] == pytest.approx(2 / 3)
    assert m["precision_pos"] == pytest.approx(2 / 3)
    assert m["f1_pos"] == pytest.approx(2 / 3) and m["macro_f1"] == pytest.approx(2 / 3)
    # AUC: positive/negative pairs ranked right: 0.35 beats 0.1 (1), 0.8 and 0.9 beat all (3 + 3) -> 7/9.
    assert m["auc"] == pytest.approx(7 / 9)
    # AP: descending 0.9P 0.8P 0.6N 0.4N 0.35P 0.1N -> 1/3*1 + 1/3*1 + 1/3*3/5 = 13/15.
    assert m["average_precision"] == pytest.approx(13 / 15)
    # Brier: 2 * (p1 - y)^2 per slide = 2 * (.01 + .16 + .36 + .4225 + .04 + .01) / 6.
    assert m["brier"] == pytest.approx(2 * 1.0025 / 6)
    # ECE (15 bins): {.9,.9} both right |1.8-2|; {.6,.6} one right |1.2-1|; {.65} wrong .65;
    # {.8} right |.8-1| -> (.2 + .2 + .65 + .2) / 6.
    assert m["ece"] == pytest.approx(1.25 / 6)


def test_tied_scores_auc_counts_half():
    y = np.array([0, 1, 0, 1])
    p1 = np.array([0.5, 0.5, 0.2, 0.9])
    # pairs (pos, neg): (.5,.5) tie 1/2, (.5,.2) 1, (.9,.5) 1, (.9,.2) 1 -> 3.5/4
    m = compute_metrics(y, np.c_[1 - p1, p1], ["a", "b"])
    assert m["auc"] == pytest.approx(3.5 / 4)
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p1))


@pytest.mark.parametrize("n_classes", [3, 4])
def test_multiclass_matches_sklearn(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 300)
    probs = rng.dirichlet(np.ones(n_classes), 300) + np.eye(n_classes)[y] * 0.3
    probs[:, 0] = np.round(probs[:, 0], 1)  # ties
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
    pred = probs.argmax(axis=1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(n_classes)[y]
    assert m["average_precision"] == pytest.approx(
        skm.average_precision_score(onehot, probs, average="macro")
    )
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for c in range(n_classes):
        assert m[f"precision_c{c}"] == pytest.approx(prec[c])
        assert m[f"recall_c{c}"] == pytest.approx(rec[c])
        assert m[f"f1_c{c}"] == pytest.approx(f1[c])
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["brier"] == pytest.approx(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def test_absent_class_gives_nan_auc_and_warns(caplog):
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    with caplog.at_level(logging.WARNING, logger="slidemil.evaluation.metrics"):
        m = compute_metrics(y, probs, ["a", "b", "c"])
    assert math.isnan(m["auc"]) and math.isnan(m["average_precision"])
    assert "absent" in caplog.text and "'c'" in caplog.text
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0  # over the classes present
    assert math.isnan(m["recall_c"]) and m["precision_c"] == 0.0


def test_json_serialisable_and_flat():
    m = compute_metrics(Y6, PROBS6, ["neg", "pos"], loss=np.float32(0.25))
    json.dumps(m, allow_nan=False)
    assert all(type(v) in (int, float, list) for v in m.values())
    flat = flat_metrics(m)
    assert "confusion_matrix" not in flat and flat["n"] == 6.0
    assert all(type(v) is float for v in flat.values())


def test_integer_weights_equal_repetition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    probs = rng.dirichlet(np.ones(3), 40)
    counts = rng.integers(1, 4, 40)
    counts[::5] = 0  # some samples left out, as in a bootstrap resample
    names = ["a", "b", "c"]
    weighted = weighted_scalar_metrics(y, probs, counts[None, :].astype(float), names)
    idx = np.repeat(np.arange(40), counts)
    repeated = compute_metrics(y[idx], probs[idx], names)
    for name, values in weighted.items():
        assert values[0] == pytest.approx(repeated[name], nan_ok=True), name


def test_ece_calibrated_small_overconfident_large():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    y = (rng.uniform(size=n) < conf).astype(int)  # class 1 is right with probability conf
    calibrated = compute_metrics(y, np.c_[1 - conf, conf], ["a", "b"])
    assert calibrated["ece"] < 0.02
    y_over = (rng.uniform(size=n) < 0.6).astype(int)  # right 60% of the time at 0.99 confidence
    over = compute_metrics(y_over, np.tile([0.01, 0.99], (n, 1)), ["a", "b"])
    assert over["ece"] == pytest.approx(0.39, abs=0.02)


def test_bad_inputs():
    with pytest.raises(LabelTableError):
        compute_metrics(np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])


def test_is_better_and_modes():
    assert MONITOR_MODES["auc"] == "max" and MONITOR_MODES["loss"] == "min"
    assert is_better("auc", 0.9, 0.8) and not is_better("auc", 0.8, 0.9)
    assert is_better("loss", 0.1, 0.2) and not is_better("loss", 0.2, 0.2)
    assert is_better("balanced_accuracy", 0.5, None) and is_better("auc", 0.5, float("nan"))
    assert not is_better("auc", float("nan"), 0.1)
    assert monitor_mode("f1_tumour") == "max"
    with pytest.raises(ConfigError):
        is_better("nonsense", 1.0, 0.0)
