"""The operating point of a classifier: the probability threshold at which it names its class.

A head's softmax probabilities rank slides well long before ``argmax`` puts the boundary in the right
place: a head that found a lesion of a few tiles may still give its slides p = 0.3. The trainer
therefore chooses, on the validation slides of the kept checkpoint, the threshold on one class's
probability that maximises balanced accuracy (equivalently Youden's J = TPR + TNR - 1) of that class
against the rest, records it in the checkpoint and the package manifest, and the engine applies it
(:func:`predict_index`); the probabilities themselves are never changed.

Record (``operating_point``)::

    {"class": "tumour", "class_index": 1, "threshold": 0.31, "criterion": "balanced_accuracy",
     "chosen_on": "validation slides of the kept checkpoint (8 slides)", "rule": ...,
     "val_balanced_accuracy": 1.0, "val_balanced_accuracy_argmax": 0.75, "min_gain": 0.25}

Rule: predict ``class`` where its probability is >= ``threshold``, else the most probable of the
other classes. The threshold (two classes) stays at 0.5, argmax, unless the best cut beats argmax on the
validation slides by at least what two slides of the smaller class are worth in balanced accuracy
(``1 / min(n_class, n_rest)``: 0.25 on 4 + 4 slides, 0.02 on 50 + 50): one slide on the wrong side of
0.5 is no evidence for another cut, and moving to fit it moves the boundary for every slide the package
will score. Where the cut is taken, among the thresholds that give the best balanced accuracy (an
interval between two neighbouring validation scores, or several), the widest interval is taken and the
threshold is its midpoint in logit space, as far from both sides' slides as they allow.

Measured (``bench/model_selection.py``, the default head's final epochs over 90 folds of 5-fold CV on the
synthetic small-lesion cohorts, 8-10 validation slides per fold), mean test balanced accuracy: 0.952 with
this rule, 0.950 at argmax, 0.941 when any validation gain moved the cut, on the cohorts the rule was
chosen on; 0.924, 0.924 and 0.911 on two cohorts made after. On 260 earlier folds of every head (best
validation epochs): 0.848, 0.857 and 0.848. On these cohorts a threshold from a handful of slides gains
little over argmax; the rule is there for heads whose positives sit below 0.5, which the validation
slides then show on several slides at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RULE = "predict `class` where its probability >= threshold, else the most probable other class"
_EPS = 1e-7


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def balanced_accuracy_at(scores: np.ndarray, positive: np.ndarray, threshold: float) -> float:
    """Balanced accuracy of ``scores >= threshold`` against ``positive`` (both classes present)."""
    pred = np.asarray(scores) >= threshold
    pos = np.asarray(positive, bool)
    return float(0.5 * (pred[pos].mean() + (~pred[~pos]).mean()))


def choose_operating_point(labels: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                           class_index: int = 1, chosen_on: str = "validation slides") -> dict[str, Any] | None:
    """The threshold on ``probs[:, class_index]`` with the best balanced accuracy (see the module docstring).

    Args:
        labels: (S,) true class indices.
        probs: (S, C) probabilities.
        class_names: (C,) names.
        class_index: the class the threshold is for (binary: 1, the positive class).
        chosen_on: recorded as ``chosen_on`` (the slide count is appended).

    Returns:
        The record, or None when the slides lack the class or its complement (nothing to choose from).
    """
    y = np.asarray(labels)
    p = np.asarray(probs, np.float64)
    scores, positive = p[:, class_index], y == class_index
    if positive.all() or not positive.any():
        return None
    values = np.unique(scores)  # ascending; a cut at values[j] predicts scores >= values[j] positive
    best, runs = -1.0, []
    for j, cut in enumerate(values):
        ba = balanced_accuracy_at(scores, positive, float(cut))
        if ba > best + 1e-12:
            best, runs = ba, [[j, j]]
        elif abs(ba - best) <= 1e-12:
            if runs and runs[-1][1] == j - 1:
                runs[-1][1] = j
            else:
                runs.append([j, j])

    def interval(run: list[int]) -> tuple[float, float]:
        lo = _logit(float(values[run[0] - 1])) if run[0] > 0 else _logit(float(values[run[0]])) - 2.0
        return lo, _logit(float(values[run[1]]))

    argmax_ba = balanced_accuracy_at(np.asarray(p.argmax(axis=1) == class_index, np.float64), positive, 0.5)
    min_gain = 1.0 / min(int(positive.sum()), int((~positive).sum()))  # two slides of the smaller class
    if p.shape[1] == 2 and best - balanced_accuracy_at(scores, positive, 0.5) < min_gain - 1e-12:
        threshold = 0.5  # the validation slides give no evidence for another cut than argmax
    else:
        lo, hi = max((interval(r) for r in runs), key=lambda iv: iv[1] - iv[0])
        threshold = _sigmoid(0.5 * (lo + hi))
    return {"class": str(class_names[class_index]), "class_index": int(class_index), "threshold": float(threshold),
            "criterion": "balanced_accuracy", "chosen_on": f"{chosen_on} ({len(y)} slides)", "rule": RULE,
            "val_balanced_accuracy": round(best, 6), "val_balanced_accuracy_argmax": round(argmax_ba, 6),
            "min_gain": round(min_gain, 6)}


def predict_index(probs: np.ndarray, operating_point: Mapping[str, Any] | None) -> np.ndarray:
    """Predicted class index of each row of ``probs`` ((C,) or (S, C)) under ``operating_point``
    (None: argmax)."""
    p = np.asarray(probs, np.float64)
    single = p.ndim == 1
    p = np.atleast_2d(p)
    if operating_point is None:
        out = p.argmax(axis=1)
    else:
        c, t = int(operating_point["class_index"]), float(operating_point["threshold"])
        others = p.copy()
        others[:, c] = -np.inf
        out = np.where(p[:, c] >= t, c, others.argmax(axis=1))
    return out[0] if single else out
