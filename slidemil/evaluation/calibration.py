"""Temperature scaling (Guo et al., 2017): one scalar T divides the logits so that the softmax
probabilities match how often the model is right.

T is fitted on validation predictions by minimising the negative log-likelihood. The NLL of
``softmax(a * z)`` is convex in ``a = 1 / T`` (log-sum-exp of a linear function minus a linear
function), hence unimodal in ``log T``; a bounded Brent search on ``log T`` finds its one minimum
without gradients, learning rates or a torch dependency. Dividing by T > 0 never changes the argmax,
so accuracy and the confusion matrix stay as they were.

Probabilities work as logits too: ``log p`` differs from the logits by a per-row constant, which the
softmax ignores, so ``apply_temperature(log p, T)`` equals ``softmax(z / T)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from slidemil.evaluation.metrics import check_inputs, compute_metrics
from slidemil.evaluation.stats import calibration_curve

log = logging.getLogger(__name__)

T_BOUNDS = (0.05, 20.0)  # beyond these a model is broken, not miscalibrated
_EPS = 1e-12


def _as_array(x: Any) -> np.ndarray:
    """numpy float64 of an array-like or a (CPU or CUDA) torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, C), stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Args:
        logits: (N, C) logits (or log-probabilities).
        temperature: T > 0.

    Returns:
        (N, C) float64 probabilities.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _as_array(logits)
    assert z.ndim == 2, f"logits must be (N, C), got {z.shape}"
    return np.exp(log_softmax(z / temperature))


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` (N,) under ``softmax(logits / T)``."""
    z = _as_array(logits)
    y, _ = check_inputs(np.asarray(_as_array(labels), dtype=np.int64), z)
    return float(-log_softmax(z / temperature)[np.arange(len(y)), y].mean())


def logits_from_probs(probs: Any) -> np.ndarray:
    """``log p`` (clipped away from 0): logits up to a per-row constant, for temperature scaling."""
    return np.log(np.clip(_as_array(probs), _EPS, 1.0))


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    Args:
        logits: (N, C) logits, as a numpy array or torch tensor.
        labels: (N,) integer class indices.
        bounds: search interval of T.

    Returns:
        T as a python float; > 1 softens an overconfident model, < 1 sharpens an underconfident one.

    Raises:
        ValueError: no samples, or shapes that do not fit.
    """
    from scipy.optimize import minimize_scalar

    z = _as_array(logits)
    y, z = check_inputs(np.asarray(_as_array(labels), dtype=np.int64), z)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t))[rows, y].mean())

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    log_t = float(result.x)
    if objective(0.0) <= result.fun:  # never worse than leaving the model alone
        log_t = 0.0
    if min(log_t - lo, hi - log_t) < 1e-3:
        log.warning("temperature %.3g lies at the edge of its search interval %s: the validation "
                    "predictions are (nearly) separable or degenerate", math.exp(log_t), bounds)
    return math.exp(log_t)


def temperature_views(fit_y: np.ndarray | None, fit_probs: np.ndarray | None, eval_probs: np.ndarray,
                      stored_temperature: float | None = None) -> tuple[float, str, np.ndarray, np.ndarray]:
    """Probabilities of the evaluation slides before and after temperature scaling.

    When the model already carries a temperature (``stored_temperature`` other than 1: its
    probabilities are calibrated), "before" undoes it, ``softmax(T * log p)``. Otherwise T is fitted
    on the fit set (validation slides) and applied to ``eval_probs``.

    Returns:
        ``(T, source, before, after)``; ``source`` says where T comes from.

    Raises:
        ValueError: neither a stored temperature nor validation predictions.
    """
    p = np.asarray(eval_probs, dtype=np.float64)
    if stored_temperature is not None and stored_temperature > 0 and stored_temperature != 1.0:
        t = float(stored_temperature)
        return t, "stored in the checkpoint", apply_temperature(logits_from_probs(p), 1.0 / t), p
    if fit_y is not None and fit_probs is not None and len(fit_y) > 0:
        t = fit_temperature(logits_from_probs(fit_probs), fit_y)
        return t, f"fitted on {len(fit_y)} validation slides", p, apply_temperature(logits_from_probs(p), t)
    raise ValueError("need validation predictions or a stored temperature")


def calibration_scores(y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """ECE, Brier score, NLL and the reliability curve of probabilities (N, C) for labels (N,)."""
    m = compute_metrics(y, probs, class_names)
    return {"ece": m["ece"], "brier": m["brier"], "nll": nll(logits_from_probs(probs), y),
            "curve": calibration_curve(y, probs)}


def calibration_before_after(fit_y: np.ndarray | None, fit_probs: np.ndarray | None, eval_y: np.ndarray,
                             eval_probs: np.ndarray, class_names: list[str],
                             stored_temperature: float | None = None) -> dict[str, Any]:
    """Calibration of the evaluation slides before and after temperature scaling.

    Returns:
        ``temperature``, ``source`` and ``before``/``after``: :func:`calibration_scores` each.
    """
    t, source, before, after = temperature_views(fit_y, fit_probs, eval_probs, stored_temperature)
    y = np.asarray(eval_y, dtype=np.int64)
    return {"temperature": t, "source": source, "before": calibration_scores(y, before, class_names),
            "after": calibration_scores(y, after, class_names)}
