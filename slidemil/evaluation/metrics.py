"""Classification metrics of slide predictions, shared by training, reports and bootstraps.

Every scalar metric comes from one kernel, :func:`weighted_scalar_metrics`, which evaluates the
metrics for a batch of sample-weight vectors at once. Unit weights give the metrics of the data;
bootstrap resample counts give the metrics of every resample without a Python loop per resample
(``slidemil.evaluation.stats``). One code path means a bootstrap interval always brackets the very
number the trainer logged.

Conventions (sklearn's where it has one): precision of a class never predicted is 0; recall and F1
of a class absent from the labels are NaN and left out of the macro averages; AUC and average
precision are NaN when a class is absent from the labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from slidemil.errors import ConfigError, LabelTableError

logger = logging.getLogger(__name__)

N_ECE_BINS = 15

MONITOR_MODES: dict[str, str] = {
    "auc": "max",
    "balanced_accuracy": "max",
    "accuracy": "max",
    "macro_f1": "max",
    "average_precision": "max",
    "loss": "min",
    "ece": "min",
    "brier": "min",
}
_PER_CLASS_PREFIXES = ("acc_", "precision_", "recall_", "f1_")


def check_inputs(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (N,) and probabilities (N, C); return them as int64 and float64 arrays.

    Raises:
        ValueError: on shapes that do not fit together.
        LabelTableError: on labels that are not integers in ``[0, C)``.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"need labels (N,) and probabilities (N, C); got {y.shape} and {p.shape}")
    if class_names is not None and p.shape[1] != len(class_names):
        raise ValueError(f"probabilities have {p.shape[1]} columns for {len(class_names)} class names")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0)):
            raise LabelTableError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise LabelTableError(f"labels must lie in [0, {p.shape[1]}); found {y.min()}..{y.max()}")
    return y, p


def confidence_bins(probs: np.ndarray, n_bins: int = N_ECE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Return the confidence (max probability, (N,)) and its bin index among ``n_bins`` equal bins.

    Bins are ``(lo, hi]`` with edges ``linspace(0, 1, n_bins + 1)``; a confidence of 0 falls in bin 0.
    """
    conf = np.asarray(probs, dtype=np.float64).max(axis=1)
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return conf, np.searchsorted(inner, conf, side="left")


def weighted_confusion(y: np.ndarray, pred: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices (B, C, C), rows = true class, for sample weights (B, N)."""
    pair = np.zeros((len(y), n_classes * n_classes))
    pair[np.arange(len(y)), y * n_classes + pred] = 1.0
    return (weights @ pair).reshape(len(weights), n_classes, n_classes)


def weighted_scalar_metrics(
    y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Evaluate every scalar metric for each row of sample weights.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) class probabilities.
        weights: (B, N) non-negative sample weights (bootstrap counts, or ones).
        class_names: C names, used in the per-class keys.

    Returns:
        Metric name -> (B,) float64 array.
    """
    y, p = check_inputs(y_true, probs, class_names)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != len(y):
        raise ValueError(f"weights {w.shape} do not match {len(y)} samples")
    total = w.sum(axis=1)
    per_class = _confusion_scores(y, p.argmax(axis=1), w, p.shape[1])
    out = {
        "accuracy": per_class.pop("accuracy"),
        "balanced_accuracy": _nanmean_rows(per_class["recall"]),
        "macro_f1": _nanmean_rows(per_class["f1"]),
    }
    out["auc"], out["average_precision"] = _ranking_scores(y, p, w)
    out["ece"], out["brier"] = _calibration_scores(y, p, w, total)
    for key, prefix in (
        ("recall", "acc_"),
        ("precision", "precision_"),
        ("recall", "recall_"),
        ("f1", "f1_"),
    ):
        for c, name in enumerate(class_names):
            out[f"{prefix}{name}"] = per_class[key][:, c]
    return out


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], loss: float | None = None
) -> dict[str, Any]:
    """Metrics of slide predictions, JSON-serialisable (python ints, floats and lists).

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) class probabilities.
        class_names: C class names.
        loss: mean loss to record alongside, if known.

    Returns:
        ``n``, ``loss`` (if given), accuracy, balanced_accuracy, macro_f1, auc, average_precision,
        ece, brier, ``acc_<c>`` (= recall), ``precision_<c>``, ``recall_<c>``, ``f1_<c>`` and
        ``confusion_matrix`` (list of lists, rows = true class).
    """
    y, p = check_inputs(y_true, probs, class_names)
    if len(y) == 0:
        raise ValueError("no samples to score")
    ones = np.ones((1, len(y)))
    absent = [name for c, name in enumerate(class_names) if not np.any(y == c)]
    if absent:
        logger.warning(
            "class(es) %s absent from the labels of %d samples: auc and average_precision are NaN",
            absent,
            len(y),
        )
    out: dict[str, Any] = {"n": int(len(y))}
    if loss is not None:
        out["loss"] = float(loss)
    out.update({k: float(v[0]) for k, v in weighted_scalar_metrics(y, p, ones, class_names).items()})
    cm = weighted_confusion(y, p.argmax(axis=1), ones, len(class_names))[0]
    out["confusion_matrix"] = [[int(v) for v in row] for row in cm]
    return out


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar subset of ``metrics`` (for CSV rows and loggers), as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }


def monitor_mode(metric_name: str) -> str:
    """``"max"`` or ``"min"``: which direction of ``metric_name`` is better.

    Raises:
        ConfigError: for a metric that cannot be monitored.
    """
    if metric_name in MONITOR_MODES:
        return MONITOR_MODES[metric_name]
    if metric_name.startswith(_PER_CLASS_PREFIXES):
        return "max"
    raise ConfigError(
        f"cannot monitor {metric_name!r}; choose one of {sorted(MONITOR_MODES)} "
        f"or a per-class metric ({', '.join(p + '<class>' for p in _PER_CLASS_PREFIXES)})"
    )


def is_better(metric_name: str, new: float | None, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` for ``metric_name``; NaN or None never wins, and any
    number beats a missing or NaN best."""
    mode = monitor_mode(metric_name)
    if new is None or math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new > best if mode == "max" else new < best


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    n = ok.sum(axis=1)
    s = np.where(ok, x, 0.0).sum(axis=1)
    return np.divide(s, n, out=np.full(len(x), np.nan), where=n > 0)


def _safe_divide(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, fill), where=den > 0)


def _confusion_scores(
    y: np.ndarray, pred: np.ndarray, w: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    cm = weighted_confusion(y, pred, w, n_classes)  # (B, C, C)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    n_true = cm.sum(axis=2)
    n_pred = cm.sum(axis=1)
    return {
        "accuracy": _safe_divide(tp.sum(axis=1), cm.sum(axis=(1, 2)), np.nan),
        "precision": _safe_divide(tp, n_pred, 0.0),
        "recall": _safe_divide(tp, n_true, np.nan),
        "f1": _safe_divide(2.0 * tp, n_true + n_pred, np.nan),
    }


def _calibration_scores(
    y: np.ndarray, p: np.ndarray, w: np.ndarray, total: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    conf, bins = confidence_bins(p)
    gap = conf - (p.argmax(axis=1) == y)
    per_bin = np.zeros((len(y), N_ECE_BINS))
    per_bin[np.arange(len(y)), bins] = gap
    # |sum(conf) - sum(correct)| per bin over N equals sum_b n_b/N * |conf_b - acc_b|.
    ece = _safe_divide(np.abs(w @ per_bin).sum(axis=1), total, np.nan)
    onehot = np.eye(p.shape[1])[y]
    brier = _safe_divide(w @ ((p - onehot) ** 2).sum(axis=1), total, np.nan)
    return ece, brier


def _ranking_scores(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.shape[1] == 2:
        return _weighted_auc(p[:, 1], y == 1, w), _weighted_ap(p[:, 1], y == 1, w)
    aucs = np.stack([_weighted_auc(p[:, c], y == c, w) for c in range(p.shape[1])])
    aps = np.stack([_weighted_ap(p[:, c], y == c, w) for c in range(p.shape[1])])
    return aucs.mean(axis=0), aps.mean(axis=0)  # one-vs-rest macro; NaN if any class is


def _tie_starts(sorted_scores: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def _grouped_weights(
    score: np.ndarray, pos: np.ndarray, w: np.ndarray, descending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight (B, G) per group of tied scores, groups sorted by score."""
    order = np.argsort(-score if descending else score, kind="stable")
    starts = _tie_starts(score[order])
    ws = w[:, order]
    pos_s = pos[order]
    g_pos = np.add.reduceat(ws * pos_s, starts, axis=1)
    g_neg = np.add.reduceat(ws * ~pos_s, starts, axis=1)
    return g_pos, g_neg


def _weighted_auc(score: np.ndarray, pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC (B,) as the Mann-Whitney statistic with weighted samples; ties count one half."""
    g_pos, g_neg = _grouped_weights(score, pos, w, descending=False)
    neg_below = np.cumsum(g_neg, axis=1) - g_neg
    u = (g_pos * (neg_below + 0.5 * g_neg)).sum(axis=1)
    return _safe_divide(u, g_pos.sum(axis=1) * g_neg.sum(axis=1), np.nan)


def _weighted_ap(score: np.ndarray, pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (B,): sum over thresholds of (R_n - R_{n-1}) P_n, as sklearn computes it."""
    g_tp, g_fp = _grouped_weights(score, pos, w, descending=True)
    tps = np.cumsum(g_tp, axis=1)
    precision = _safe_divide(tps, tps + np.cumsum(g_fp, axis=1), 0.0)
    return _safe_divide((g_tp * precision).sum(axis=1), tps[:, -1], np.nan)
