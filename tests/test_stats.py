"""Bootstrap intervals, calibration curves and patient aggregation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from slidemil.errors import LabelTableError
from slidemil.evaluation.metrics import compute_metrics
from slidemil.evaluation.stats import (
    aggregate_by_patient,
    bootstrap_ci,
    bootstrap_metrics,
    calibration_curve,
    resample_indices,
)


def noisy_binary(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0.01, 0.99)
    return y, np.c_[1 - p1, p1]


def test_perfect_classifier_auc_has_degenerate_interval():
    y = np.array([0] * 10 + [1] * 10)
    p1 = np.r_[np.linspace(0.05, 0.4, 10), np.linspace(0.6, 0.95, 10)]
    probs = np.c_[1 - p1, p1]
    assert bootstrap_ci(y, probs, "auc", n_boot=200) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(y, probs, lambda t, p: roc_auc_score(t, p[:, 1]), n_boot=50) == (1.0, 1.0, 1.0)
    result = bootstrap_metrics(y, probs, ["a", "b"], n_boot=200)
    assert result["auc"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert result["accuracy"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_stratified_resamples_keep_class_counts():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    idx = resample_indices(y, 100, np.random.default_rng(0))
    assert idx.shape == (100, 15)
    for c, n in ((0, 7), (1, 3), (2, 5)):
        assert ((y[idx] == c).sum(axis=1) == n).all()


def test_vectorised_and_callable_paths_agree():
    y, probs = noisy_binary()
    by_name = bootstrap_ci(y, probs, "auc", n_boot=200, seed=3)
    by_fn = bootstrap_ci(y, probs, lambda t, p: roc_auc_score(t, p[:, 1]), n_boot=200, seed=3)
    assert by_name == pytest.approx(by_fn, rel=1e-12)
    point, low, high = by_name
    assert low < point < high and 0.0 < high - low < 0.3


def test_bootstrap_metrics_points_equal_compute_metrics_and_is_seeded():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 120)
    probs = rng.dirichlet(np.ones(3), 120) + 0.5 * np.eye(3)[y]
    probs /= probs.sum(axis=1, keepdims=True)
    names = ["a", "b", "c"]
    result = bootstrap_metrics(y, probs, names, n_boot=300, seed=5)
    m = compute_metrics(y, probs, names)
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "auc",
        "average_precision",
        "ece",
        "brier",
        "precision_a",
        "recall_b",
        "f1_c",
    ):
        r = result[key]
        assert r["value"] == pytest.approx(m[key])
        assert r["low"] <= r["high"] and all(type(v) is float for v in r.values())
    assert "loss" not in result and "n" not in result and "confusion_matrix" not in result
    assert bootstrap_metrics(y, probs, names, n_boot=300, seed=5) == result
    assert bootstrap_metrics(y, probs, names, n_boot=300, seed=6)["auc"] != result["auc"]


def test_unstratified_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 9 + [1])
    probs = np.c_[np.linspace(0.9, 0.1, 10), np.linspace(0.1, 0.9, 10)]
    point, low, high = bootstrap_ci(y, probs, "auc", n_boot=100, stratified=False)
    assert point == 1.0 and low == 1.0 and high == 1.0  # resamples without the positive are left out


def test_calibration_curve():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    y = np.array([1, 0, 1, 1, 0, 0])
    curve = calibration_curve(y, np.c_[1 - conf, conf], n_bins=10)
    assert len(curve["bin_edges"]) == 11 and sum(curve["bin_count"]) == 6
    assert curve["bin_count"][9] == 2 and curve["bin_count"][5] == 4
    assert curve["bin_accuracy"][9] == 0.5 and curve["bin_confidence"][5] == pytest.approx(0.55)
    assert math.isnan(curve["bin_accuracy"][0])
    # ECE: (2 * |.95 - .5| + 4 * |.55 - .5|) / 6
    assert curve["ece"] == pytest.approx((2 * 0.45 + 4 * 0.05) / 6)
    y2, probs2 = noisy_binary(300)
    assert calibration_curve(y2, probs2)["ece"] == pytest.approx(
        compute_metrics(y2, probs2, ["a", "b"])["ece"]
    )


def test_aggregate_by_patient():
    df = pd.DataFrame(
        {
            "patient_id": ["p1", "p1", "p2", None],
            "label": [1, 1, 0, 0],
            "prob_a": [0.2, 0.4, 0.9, 0.7],
            "prob_b": [0.8, 0.6, 0.1, 0.3],
        },
        index=["s1", "s2", "s3", "s4"],
    )
    out = aggregate_by_patient(df, ["prob_a", "prob_b"])
    assert list(out["patient_id"]) == ["p1", "p2", "s4"]
    assert list(out.columns) == ["patient_id", "label", "prob_a", "prob_b", "n_slides"]
    row = out.iloc[0]
    assert row["prob_a"] == pytest.approx(0.3) and row["label"] == 1 and row["n_slides"] == 2
    df.loc["s2", "label"] = 0
    with pytest.raises(LabelTableError, match="p1"):
        aggregate_by_patient(df, ["prob_a", "prob_b"])
    with pytest.raises(LabelTableError, match="prob_c"):
        aggregate_by_patient(df, ["prob_c"])
