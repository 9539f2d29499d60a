"""Plots of a run and of its predictions, drawn on ``matplotlib.figure.Figure`` (Agg, no pyplot state).

Each ``plot_*`` function returns a Figure; :func:`save_figure` writes it as PNG and SVG, atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from slidemil.atomic import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
CURVE_PANELS = (("loss", "loss"), ("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"))
_GRID = np.linspace(0.0, 1.0, 101)


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS, dpi: int = 110) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` (atomically); return the paths."""
    paths = []
    for fmt in formats:
        path = Path(stem).with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_metadata(fmt))
        paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    # No creation date: the same data give the same bytes.
    return {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else {}


def _figure(n_panels: int = 1, width: float = 4.6, height: float = 4.0) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


# -- training ----------------------------------------------------------------------------------
def plot_training_curves(metrics: pd.DataFrame, best_epoch: int | None = None, title: str = "") -> Figure:
    """Loss, AUC and balanced accuracy per epoch, train vs validation, the kept epoch marked.

    Args:
        metrics: the run's ``metrics.csv`` (epoch, train_loss, val_loss, val_auc, ...).
        best_epoch: the epoch of the kept checkpoint (``checkpoint_best``).
        title: figure title.
    """
    panels = [(key, label) for key, label in CURVE_PANELS
              if any(f"{part}_{key}" in metrics.columns for part in ("train", "val"))]
    fig, axes = _figure(max(1, len(panels)), 4.2, 3.4)
    epochs = metrics["epoch"].to_numpy()
    for ax, (key, label) in zip(axes, panels):
        for part, style in (("train", "-"), ("val", "-")):
            col = f"{part}_{key}"
            if col in metrics.columns and metrics[col].notna().any():
                ax.plot(epochs, metrics[col].to_numpy(float), style, marker="o", markersize=3,
                        label="train" if part == "train" else "validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.3", linestyle="--", linewidth=1, label=f"kept epoch ({best_epoch})")
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_cv_curves(folds: Mapping[int, pd.DataFrame], keys: Sequence[str] = ("val_loss", "val_auc",
                                                                             "val_balanced_accuracy")) -> Figure:
    """Per-fold validation curves (thin), their mean over folds (thick) and a mean +- std band."""
    keys = [k for k in keys if any(k in f.columns for f in folds.values())]
    fig, axes = _figure(max(1, len(keys)), 4.2, 3.4)
    for ax, key in zip(axes, keys):
        table = pd.concat({i: f.set_index("epoch")[key] for i, f in folds.items() if key in f.columns}, axis=1)
        for i in table.columns:
            ax.plot(table.index, table[i], linewidth=0.9, alpha=0.55, label=f"fold {i}")
        mean, std = table.mean(axis=1), table.std(axis=1, ddof=1).fillna(0.0)
        ax.plot(table.index, mean, color="black", linewidth=2.2, label="mean")
        ax.fill_between(table.index, mean - std, mean + std, color="0.5", alpha=0.25, label="mean +- std")
        ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# -- predictions -------------------------------------------------------------------------------
def _one_vs_rest(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, is_class, score) per curve: the positive class only for binary problems."""
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    return [(class_names[c], y == c, probs[:, c]) for c in classes if 0 < (y == c).sum() < len(y)]


def plot_roc(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """ROC curve per class (one-vs-rest; the positive class for binary), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax,) = _figure()
    for name, pos, score in _one_vs_rest(y, probs, class_names):
        fpr, tpr, _ = roc_curve(pos, score)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {roc_auc_score(pos, score):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(-0.01, 1.01),
           ylim=(-0.01, 1.01), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pr(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Precision-recall curve per class, average precision in the legend, prevalence dotted."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, (ax,) = _figure()
    for name, pos, score in _one_vs_rest(y, probs, class_names):
        precision, recall, _ = precision_recall_curve(pos, score)
        line = ax.step(recall, precision, where="post", linewidth=1.8,
                       label=f"{name} (AP {average_precision_score(pos, score):.3f})")[0]
        ax.axhline(pos.mean(), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
           aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Confusion matrix as counts and row-normalised (recall on the diagonal), rows = true class."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = 1.2 + 0.7 * len(class_names)
    fig, axes = _figure(2, max(3.6, side), max(3.2, side))
    for ax, values, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    color="white" if v > 0.6 * values.max() else "black", fontsize=9)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45 if len(class_names) > 3 else 0, ha="right"
                      if len(class_names) > 3 else "center")
        ax.set_yticks(ticks, class_names)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_reliability(curves: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, one line per curve, and counts.

    Args:
        curves: label (e.g. "before", "after T=1.8") -> ``calibration_curve`` output.
    """
    fig = Figure(figsize=(4.8, 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    for k, (label, curve) in enumerate(curves.items()):
        edges = np.asarray(curve["bin_edges"])
        conf = np.asarray(curve["bin_confidence"], dtype=float)
        acc = np.asarray(curve["bin_accuracy"], dtype=float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        ece = curve.get("ece")
        top.plot(conf[ok], acc[ok], marker="o", linewidth=1.6,
                 label=f"{label} (ECE {ece:.3f})" if ece is not None else label)
        width = (edges[1] - edges[0]) / max(1, len(curves))
        bottom.bar(edges[:-1] + k * width, curve["bin_count"], width=width, align="edge", alpha=0.7, label=label)
    top.set(ylabel="fraction correct", title="reliability", xlim=(0, 1), ylim=(0, 1.02))
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence (max probability)", ylabel="count")
    bottom.grid(alpha=0.3)
    return fig


def plot_cv_roc(folds: Mapping[int, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> Figure:
    """ROC of each fold's test slides (thin), the mean TPR over folds (thick) and a +- std band.

    For more than two classes, each fold's curve is the macro mean of its one-vs-rest curves.
    """
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure()
    tprs = []
    for i, (y, probs) in sorted(folds.items()):
        per_class = [np.interp(_GRID, *roc_curve(pos, score)[:2]) for _, pos, score in
                     _one_vs_rest(y, probs, class_names)]
        if not per_class:
            continue
        tpr = np.mean(per_class, axis=0)
        tpr[0] = 0.0
        tprs.append(tpr)
        ax.plot(_GRID, tpr, linewidth=0.9, alpha=0.55, label=f"fold {i} (AUC {_area(tpr):.3f})")
    if tprs:
        mean, std = np.mean(tprs, axis=0), np.std(tprs, axis=0, ddof=1) if len(tprs) > 1 else np.zeros_like(_GRID)
        ax.plot(_GRID, mean, color="black", linewidth=2.2, label=f"mean (AUC {_area(mean):.3f})")
        ax.fill_between(_GRID, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="0.5", alpha=0.25,
                        label="mean +- std")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per fold", aspect="equal",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def _area(tpr: np.ndarray) -> float:
    return float(np.sum((tpr[1:] + tpr[:-1]) * np.diff(_GRID)) / 2.0)


def evaluation_plots(rows: pd.DataFrame, class_names: Sequence[str], result: Mapping[str, Any],
                     out_dir: str | Path) -> dict[str, list[Path]]:
    """ROC, precision-recall, confusion and reliability plots of evaluated rows, under ``out_dir``.

    Returns:
        Plot name -> the files written (``roc``, ``pr``, ``confusion``, ``reliability``).
    """
    out = Path(out_dir)
    y = rows["label"].to_numpy(np.int64)
    probs = rows[[f"prob_{c}" for c in class_names]].to_numpy(np.float64)
    figures = {"confusion": plot_confusion(result["confusion_matrix"], class_names),
               "reliability": plot_reliability({"predictions": result["calibration"]})}
    if _one_vs_rest(y, probs, class_names):
        figures["roc"] = plot_roc(y, probs, class_names)
        figures["pr"] = plot_pr(y, probs, class_names)
    else:
        log.warning("every evaluated slide has the same label: no ROC or precision-recall curve")
    return {name: save_figure(fig, out / name) for name, fig in figures.items()}
