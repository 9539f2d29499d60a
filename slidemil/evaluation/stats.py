"""Uncertainty and calibration of slide predictions: bootstrap intervals, reliability curves,
and patient-level aggregation.

The bootstrap is vectorised: a resample is a vector of counts over the original samples, and the
metric kernel of :mod:`slidemil.evaluation.metrics` scores a whole batch of count vectors at once, so
1,000 resamples of 1,000 slides take well under a second or two on a small CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from slidemil.errors import LabelTableError
from slidemil.evaluation.metrics import N_ECE_BINS, check_inputs, confidence_bins, weighted_scalar_metrics

logger = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float]
_MAX_CELLS_PER_CHUNK = 2_000_000  # resamples x samples scored at once: bounds memory to tens of MB


def resample_indices(
    y_true: np.ndarray, n_boot: int, rng: np.random.Generator, stratified: bool = True
) -> np.ndarray:
    """Bootstrap resamples as indices (n_boot, N) into the samples.

    With ``stratified``, each resample draws every class's samples from that class only, so each
    resample holds each class exactly as often as the data does.
    """
    y = np.asarray(y_true)
    n = len(y)
    if not stratified:
        return rng.integers(0, n, size=(n_boot, n))
    parts = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        parts.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(parts, axis=1)


def indices_to_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` samples appears in each resample: (B, N) indices -> (B, N) float counts."""
    rows = np.arange(len(indices))[:, None] * n
    return (
        np.bincount((rows + indices).ravel(), minlength=len(indices) * n)
        .reshape(len(indices), n)
        .astype(float)
    )


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric_fn: MetricFn | str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval of one metric.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) class probabilities.
        metric_fn: ``f(y_true, probs) -> float``, called once per resample; or the name of a
            scalar metric of :func:`slidemil.evaluation.metrics.compute_metrics` (e.g. ``"auc"``),
            scored for all resamples at once.
        n_boot: number of resamples.
        seed: seed of the resampling.
        alpha: the interval covers ``1 - alpha``.
        stratified: resample within each class (every resample then has every class).

    Returns:
        ``(point, low, high)``; NaN resamples (an undefined metric) are left out of the interval.
    """
    y, p = check_inputs(y_true, probs)
    indices = resample_indices(y, n_boot, np.random.default_rng(seed), stratified)
    if isinstance(metric_fn, str):
        names = [str(c) for c in range(p.shape[1])]
        point = float(weighted_scalar_metrics(y, p, np.ones((1, len(y))), names)[metric_fn][0])
        values = _batched_metrics(y, p, indices, names)[metric_fn]
    else:
        point = float(metric_fn(y, p))
        values = np.array([metric_fn(y[idx], p[idx]) for idx in indices], dtype=np.float64)
    low, high = _percentile_interval(values, alpha, str(metric_fn))
    return point, low, high


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> dict[str, dict[str, float]]:
    """Bootstrap intervals of every scalar metric of ``compute_metrics`` (loss and n excepted).

    Returns:
        Metric name -> ``{"value": point, "low": ..., "high": ...}`` (python floats).
    """
    y, p = check_inputs(y_true, probs, class_names)
    if len(y) == 0:
        raise ValueError("no samples to bootstrap")
    point = weighted_scalar_metrics(y, p, np.ones((1, len(y))), class_names)
    indices = resample_indices(y, n_boot, np.random.default_rng(seed), stratified)
    boot = _batched_metrics(y, p, indices, class_names)
    out = {}
    for name, values in boot.items():
        low, high = _percentile_interval(values, alpha, name)
        out[name] = {"value": float(point[name][0]), "low": low, "high": high}
    return out


def calibration_curve(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_ECE_BINS
) -> dict[str, list[float]]:
    """Reliability diagram data on the max-probability confidence, ``n_bins`` equal-width bins.

    Returns:
        ``bin_edges`` (n_bins + 1), and per bin ``bin_confidence`` (mean confidence),
        ``bin_accuracy`` (fraction correct) and ``bin_count``; empty bins have NaN confidence and
        accuracy. Also ``ece``, the count-weighted mean gap (equal to the metric for 15 bins).
    """
    y, p = check_inputs(y_true, probs)
    conf, bins = confidence_bins(p, n_bins)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
    nan = np.full(n_bins, np.nan)
    mean_conf = np.divide(sum_conf, count, out=nan.copy(), where=count > 0)
    accuracy = np.divide(sum_correct, count, out=nan.copy(), where=count > 0)
    ece = float(np.abs(sum_conf - sum_correct).sum() / len(y)) if len(y) else float("nan")
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "bin_confidence": mean_conf.tolist(),
        "bin_accuracy": accuracy.tolist(),
        "bin_count": [int(c) for c in count],
        "ece": ece,
    }


def aggregate_by_patient(
    df: pd.DataFrame,
    prob_cols: Sequence[str],
    patient_col: str = "patient_id",
    label_col: str = "label",
) -> pd.DataFrame:
    """Patient-level predictions: the mean of each probability column over a patient's slides.

    Slides without a patient id count as their own patient, named by their index value.

    Returns:
        One row per patient (sorted by id): ``patient_col``, ``label_col`` (when ``df`` has it),
        the mean ``prob_cols`` and ``n_slides``.

    Raises:
        LabelTableError: on missing columns, or on a patient whose slides carry different labels.
    """
    missing = sorted({patient_col, *prob_cols} - set(df.columns))
    if missing:
        raise LabelTableError(f"cannot aggregate by patient: missing column(s) {missing}")
    own = pd.Series(df.index.astype(str), index=df.index)
    patients = df[patient_col].astype(object).where(df[patient_col].notna(), own).astype(str)
    work = df.assign(**{patient_col: patients})
    grouped = work.groupby(patient_col, sort=True)
    out = grouped[list(prob_cols)].mean()
    if label_col in df.columns:
        n_labels = grouped[label_col].nunique(dropna=False)
        mixed = n_labels.index[n_labels > 1].tolist()
        if mixed:
            raise LabelTableError(
                f"patient(s) {mixed[:5]} have slides with different labels; "
                "patient-level metrics need one label per patient"
            )
        out.insert(0, label_col, grouped[label_col].first())
    out["n_slides"] = grouped.size()
    return out.reset_index()


def _batched_metrics(
    y: np.ndarray, p: np.ndarray, indices: np.ndarray, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Scalar metrics (B,) of every resample, scored in chunks to bound memory."""
    chunk = max(1, _MAX_CELLS_PER_CHUNK // max(1, len(y)))
    parts = [
        weighted_scalar_metrics(y, p, indices_to_counts(indices[i : i + chunk], len(y)), class_names)
        for i in range(0, len(indices), chunk)
    ]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _percentile_interval(values: np.ndarray, alpha: float, name: str) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if len(finite) < len(values):
        logger.warning(
            "%s is undefined in %d of %d resamples; they are left out of its interval",
            name,
            len(values) - len(finite),
            len(values),
        )
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
