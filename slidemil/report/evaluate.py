"""`slidemil evaluate`: metrics of slide predictions against a label table, with bootstrap intervals.

Reads the ``predictions.csv`` of ``slidemil score`` (or a trainer's ``test_predictions.csv``), matches
it to a label table by ``slide_id`` and scores the slides (or patients) found in both. Nothing is
dropped silently: slides in only one of the tables, and slides whose scoring failed, are listed in
``metrics.json`` and logged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil.atomic import atomic_path, write_json
from slidemil.errors import LabelTableError
from slidemil.evaluation.metrics import compute_metrics, weighted_scalar_metrics
from slidemil.evaluation.stats import aggregate_by_patient, bootstrap_ci, bootstrap_metrics, calibration_curve

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "average_precision", "ece", "brier")
LOWER_IS_BETTER = ("ece", "brier")
_PROB = re.compile(r"^prob_(.+)$")  # ensembles add "<model>:prob_<class>": not matched


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A predictions table and its class names (from ``predictions.json`` beside it, else the columns).

    Raises:
        LabelTableError: no ``slide_id`` or ``prob_<class>`` columns, or duplicate slide ids.
    """
    path = Path(path)
    frame = pd.read_csv(path, dtype={"slide_id": str, "status": str, "error": str, "pred_class": str})
    names = [m.group(1) for c in frame.columns if (m := _PROB.match(str(c)))]
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        listed = json.loads(sidecar.read_text()).get("class_names")
        if isinstance(listed, list) and all(f"prob_{c}" in frame.columns for c in listed):
            names = [str(c) for c in listed]
    if "slide_id" not in frame.columns or not names:
        raise LabelTableError(f"{path} is not a predictions table: it needs slide_id and prob_<class> columns")
    check_unique(frame["slide_id"], path)
    return frame, names


def check_unique(ids: pd.Series, where: str | Path) -> None:
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise LabelTableError(f"{where}: slide id(s) {dup[:5]} appear more than once")


def label_indices(labels: pd.Series, class_names: Sequence[str], where: str | Path) -> pd.Series:
    """Labels given as class names or integer indices -> float indices (NaN where missing).

    Raises:
        LabelTableError: labels that are neither a class name nor an index in ``[0, C)``.
    """
    text = labels.dropna().astype(str).str.strip()
    lookup = {name: i for i, name in enumerate(class_names)}
    if text.isin(list(lookup)).all():
        mapped = text.map(lookup)
    else:
        mapped = pd.to_numeric(text, errors="coerce")
        bad = text[mapped.isna() | (mapped % 1 != 0) | (mapped < 0) | (mapped >= len(class_names))]
        if len(bad):
            raise LabelTableError(f"{where}: label(s) {sorted(set(bad))[:5]} are neither one of the classes "
                                  f"{list(class_names)} nor an index in [0, {len(class_names)})")
    return mapped.astype(float).reindex(labels.index)


def read_labels(path: str | Path, class_names: Sequence[str]) -> pd.DataFrame:
    """A label table (slide_id, label[, patient_id]) with labels as float class indices (NaN = none)."""
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
    missing = sorted({"slide_id", "label"} - set(table.columns))
    if missing:
        raise LabelTableError(f"{path}: label table lacks column(s) {missing} (needs slide_id,label[,patient_id])")
    check_unique(table["slide_id"], path)
    table["label"] = label_indices(table["label"], class_names, path)
    keep = ["slide_id", "label"] + (["patient_id"] if "patient_id" in table.columns else [])
    return table[keep]


def match_tables(preds: pd.DataFrame, class_names: Sequence[str], labels: pd.DataFrame | None,
                 ) -> tuple[pd.DataFrame, dict[str, list[str]], list[dict[str, str]]]:
    """Join predictions and labels; return the scorable rows, the missing ids and the failed rows.

    Returns:
        ``(rows, missing, failed)``: rows indexed by slide_id with ``label`` (int), ``prob_<c>`` and
        ``patient_id`` when known; ``missing = {"unlabelled": [...], "unscored": [...]}`` (scored
        slides without a label, labelled slides without a prediction); ``failed``: rows whose status
        is not ok or whose probabilities are missing, with their error.
    """
    prob_cols = [f"prob_{c}" for c in class_names]
    status = preds["status"].fillna("ok").astype(str) if "status" in preds.columns else pd.Series("ok", preds.index)
    bad = (status != "ok") | preds[prob_cols].isna().any(axis=1)
    failed = [{"slide_id": str(r.slide_id), "status": str(s) if s != "ok" else "no probabilities",
               "error": "" if pd.isna(getattr(r, "error", "")) else str(getattr(r, "error", ""))}
              for r, s in zip(preds[bad].itertuples(index=False), status[bad])]
    ok = preds[~bad].set_index("slide_id")
    own = ok[[c for c in ("label", "patient_id") if c in ok.columns]].copy()
    if labels is not None:
        table = labels.set_index("slide_id")
        if "label" in own.columns:
            log.info("labels from %d rows of the label table replace the predictions' own label column", len(table))
        own = table.reindex(ok.index).combine_first(own.drop(columns="label", errors="ignore"))
        unscored = sorted(set(table.index[table["label"].notna()]) - set(preds["slide_id"]))
    elif "label" in own.columns:
        own["label"] = label_indices(own["label"], class_names, "predictions")
        unscored = []
    else:
        raise LabelTableError("no labels: give a label table (slide_id,label[,patient_id])")
    has_label = own["label"].notna() if "label" in own.columns else pd.Series(False, own.index)
    rows = pd.concat([own[has_label], ok.loc[has_label, prob_cols]], axis=1)
    rows["label"] = rows["label"].astype(np.int64)
    return rows, {"unlabelled": sorted(own.index[~has_label]), "unscored": unscored}, failed


def scalar_metrics(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str], n_boot: int, seed: int,
                   ) -> dict[str, dict[str, float | None]]:
    """Every scalar metric with its 95% stratified bootstrap interval (None bounds without bootstrap)."""
    if n_boot > 0:
        out: dict[str, dict[str, float | None]] = {
            k: dict(v) for k, v in bootstrap_metrics(y, probs, class_names, n_boot, seed).items()}
    else:
        point = weighted_scalar_metrics(y, probs, np.ones((1, len(y))), class_names)
        out = {k: {"value": float(v[0]), "low": None, "high": None} for k, v in point.items()}
    if len(class_names) > 2:  # one-vs-rest AUC of each class (the headline auc is their macro mean)
        for c, name in enumerate(class_names):
            yc, pc = (y == c).astype(np.int64), np.c_[1 - probs[:, c], probs[:, c]]
            if n_boot > 0 and 0 < yc.sum() < len(yc):
                v, lo, hi = bootstrap_ci(yc, pc, "auc", n_boot, seed)
                out[f"auc_{name}"] = {"value": v, "low": lo, "high": hi}
            else:
                v = float(weighted_scalar_metrics(yc, pc, np.ones((1, len(y))), ["rest", name])["auc"][0])
                out[f"auc_{name}"] = {"value": v, "low": None, "high": None}
    return out


def evaluate_frame(preds: pd.DataFrame, class_names: Sequence[str], labels: pd.DataFrame | None = None,
                   by: str = "slide", n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of a predictions table (already read) against labels.

    Args:
        preds: predictions with slide_id, prob_<class> [, status, error, label, patient_id].
        class_names: the C class names, in probability-column order.
        labels: table from :func:`read_labels`; None to use the predictions' own ``label`` column.
        by: "slide" or "patient" (mean probabilities over a patient's slides).
        n_boot: bootstrap resamples (0: no intervals).
        seed: bootstrap seed.

    Returns:
        ``(result, rows)``: the JSON-able result (see :func:`evaluate_predictions`) and the scored
        rows (slide_id or patient_id, label, prob_<c>, pred, correct).
    """
    if by not in ("slide", "patient"):
        raise ValueError(f"by must be 'slide' or 'patient', got {by!r}")
    class_names = list(class_names)
    prob_cols = [f"prob_{c}" for c in class_names]
    rows, missing, failed = match_tables(preds, class_names, labels)
    if missing["unlabelled"]:
        log.warning("%d scored slide(s) have no label and are left out of the metrics: %s", len(missing["unlabelled"]),
                    _preview(missing["unlabelled"]))
    if missing["unscored"]:
        log.warning("%d labelled slide(s) have no prediction: %s", len(missing["unscored"]), _preview(missing["unscored"]))
    if failed:
        log.warning("%d slide(s) failed to score and are left out: %s", len(failed),
                    _preview([f["slide_id"] for f in failed]))
    if by == "patient":
        if "patient_id" not in rows.columns:
            raise LabelTableError("--by patient needs a patient_id column in the label table")
        rows = aggregate_by_patient(rows, prob_cols).set_index("patient_id")
    if rows.empty:
        raise LabelTableError("no slide has both a prediction and a label: check the slide ids of both tables")
    y, p = rows["label"].to_numpy(np.int64), rows[prob_cols].to_numpy(np.float64)
    rows = rows.assign(pred=p.argmax(axis=1), correct=p.argmax(axis=1) == y)
    full = compute_metrics(y, p, class_names)
    result = {
        "by": by, "n": int(len(y)), "class_names": class_names, "n_boot": int(n_boot), "seed": int(seed),
        "alpha": 0.05, "interval": "95% percentile bootstrap, stratified by class" if n_boot else "none",
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(class_names)},
        "metrics": scalar_metrics(y, p, class_names, n_boot, seed),
        "confusion_matrix": full["confusion_matrix"],
        "calibration": calibration_curve(y, p),
        "missing": missing, "failed": failed,
    }
    return json_safe(result), rows.reset_index().rename(columns={"index": "slide_id"})


def evaluate_predictions(predictions_csv: str | Path, labels_csv: str | Path | None, out_dir: str | Path,
                         by: str = "slide", n_boot: int = 1000, seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """Score a predictions table against a label table; write ``out_dir/metrics.json``.

    Also writes ``out_dir/evaluated.csv`` (the scored rows with label, pred and correct) and, with
    ``plots``, ROC, precision-recall, confusion and reliability plots under ``out_dir/plots/``.

    Args:
        predictions_csv: ``predictions.csv`` of ``slidemil score`` or a trainer's ``test_predictions.csv``.
        labels_csv: slide_id,label[,patient_id] (labels as class names or indices); None to use the
            predictions' own ``label`` column.
        out_dir: output folder.
        by: "slide" or "patient".
        n_boot: bootstrap resamples for the 95% intervals (0: none).
        seed: bootstrap seed.
        plots: write the plots too.

    Returns:
        The content of ``metrics.json`` (by, n, class_names, class_counts, ``metrics``: name ->
        {value, low, high}, confusion_matrix, calibration, ``missing``: {unlabelled, unscored},
        ``failed``: [{slide_id, status, error}], inputs) plus ``table``: the terminal table as text.
    """
    preds, class_names = read_predictions(predictions_csv)
    labels = read_labels(labels_csv, class_names) if labels_csv is not None else None
    result, rows = evaluate_frame(preds, class_names, labels, by, n_boot, seed)
    result["inputs"] = {"predictions": str(predictions_csv), "labels": None if labels_csv is None else str(labels_csv)}
    out = Path(out_dir)
    write_json(out / "metrics.json", result)
    with atomic_path(out / "evaluated.csv") as tmp:
        rows.to_csv(tmp, index=False)
    if plots:
        from slidemil.report.plots import evaluation_plots
        evaluation_plots(rows, class_names, result, out / "plots")
    return {**result, "table": format_table(result)}


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _with_ci(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    if entry.get("low") is None:
        return _fmt(entry.get("value"))
    return f"{_fmt(entry['value'])} [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table for the terminal."""
    m, names = result["metrics"], result["class_names"]
    unit = "patients" if result["by"] == "patient" else "slides"
    ci = f"95% CI, {result['n_boot']} stratified bootstrap resamples" if result["n_boot"] else "no intervals"
    lines = [f"{result['n']} {unit}, {len(names)} classes ({ci})", ""]
    width = max(len(k) for k in (*HEADLINE, *(f"auc_{c}" for c in names))) + 2
    for key in (*HEADLINE, *(f"auc_{c}" for c in names if f"auc_{c}" in m)):
        note = "  (lower is better)" if key in LOWER_IS_BETTER else ""
        lines.append(f"  {key:<{width}}{_with_ci(m.get(key))}{note}")
    cw = max(8, *(len(c) for c in names)) + 2
    lines += ["", f"  {'class':<{cw}}{'n':>5}  {'precision':<24}{'recall':<24}f1"]
    for c in names:
        lines.append(f"  {c:<{cw}}{result['class_counts'][c]:>5}  {_with_ci(m.get(f'precision_{c}')):<24}"
                     f"{_with_ci(m.get(f'recall_{c}')):<24}{_with_ci(m.get(f'f1_{c}'))}")
    lines += ["", "  confusion matrix (rows: true class, columns: predicted)",
              "  " + " " * cw + "".join(f"{c:>{cw}}" for c in names)]
    for c, row in zip(names, result["confusion_matrix"]):
        lines.append(f"  {c:<{cw}}" + "".join(f"{v:>{cw}}" for v in row))
    miss = result["missing"]
    if miss["unlabelled"] or miss["unscored"] or result["failed"]:
        lines.append("")
    if miss["unlabelled"]:
        lines.append(f"  scored but not labelled ({len(miss['unlabelled'])}): {_preview(miss['unlabelled'])}")
    if miss["unscored"]:
        lines.append(f"  labelled but not scored ({len(miss['unscored'])}): {_preview(miss['unscored'])}")
    for f in result["failed"]:
        lines.append(f"  failed: {f['slide_id']} ({f['status']}) {f['error']}".rstrip())
    return "\n".join(lines)


def _preview(ids: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(map(str, ids[:n]))
    return shown + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def json_safe(obj: Any) -> Any:
    """Plain JSON values: numpy unwrapped, NaN and infinity as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
