"""`slidemil report`: one static HTML page for a training run, a k-fold root or a scoring output.

What the folder is decides what the page holds:

- training run (``metrics.csv`` + ``checkpoint_best.json``): training curves, test metrics with
  intervals, ROC/PR/confusion/reliability, calibration before and after temperature scaling, and
  the test slides;
- k-fold root (``fold_*/`` + ``cv_summary.csv``): per-fold curves with mean and band, the per-fold
  table, metrics of the pooled test predictions, calibration per fold, and every fold's test slides;
- scoring output (``predictions.csv`` + ``heatmaps/``): metrics when labels are given, and the
  gallery of heatmaps linking each slide's full heatmap, top-k tiles and GeoJSON.

Layout of ``out_dir``: ``index.html``, ``metrics.json`` (and ``metrics_patient.json``),
``evaluated.csv``, ``plots/<name>.png|svg``, ``thumbs/<slide_id>.jpg``, and for a scoring output
``viewer/`` (deep-zoom pages of the slides: ``slidemil.report.viewer``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil.atomic import atomic_path, write_json, write_text
from slidemil.engine.outputs import slide_paths
from slidemil.errors import ConfigError, LabelTableError
from slidemil.evaluation.calibration import calibration_scores, temperature_views
from slidemil.report import plots as P
from slidemil.report.evaluate import evaluate_frame, json_safe, read_labels, read_predictions
from slidemil.report.html import Card, Plot, ReportPage, make_thumbnails, render_page
from slidemil.report.viewer import ViewerConfig, build_viewers

log = logging.getLogger(__name__)

_FOLD = re.compile(r"^fold_(\d+)$")


def detect_kind(folder: str | Path) -> str:
    """``"train"``, ``"cv"`` or ``"score"``.

    Raises:
        ConfigError: the folder is none of them.
    """
    d = Path(folder)
    if (d / "metrics.csv").is_file() and (d / "checkpoint_best.json").is_file():
        return "train"
    if (d / "cv_summary.csv").is_file() or (any(_FOLD.match(p.name) for p in d.glob("fold_*")) and
                                            (d / "splits.csv").is_file()):
        return "cv"
    if (d / "predictions.csv").is_file():
        return "score"
    raise ConfigError(f"{d} is not a training run (metrics.csv + checkpoint_best.json), a k-fold root "
                      "(fold_<i>/ + cv_summary.csv) or a scoring output (predictions.csv + heatmaps/)")


@dataclass
class _Context:
    src: Path
    out: Path
    labels_csv: Path | None
    n_boot: int
    seed: int
    viewer: ViewerConfig


def build_report(run_or_score_dir: str | Path, out_dir: str | Path, labels_csv: str | Path | None = None,
                 n_boot: int = 1000, seed: int = 0, viewer: ViewerConfig | None = None) -> Path:
    """Write ``out_dir/index.html`` (and its plots, thumbnails and metrics) for a run or scoring output.

    Args:
        run_or_score_dir: training run, k-fold root or ``slidemil score`` output folder.
        out_dir: report folder (created); links to per-slide outputs are relative to it.
        labels_csv: label table (slide_id,label[,patient_id]); needed for metrics of a scoring output,
            optional for training runs (their predictions carry labels).
        n_boot: bootstrap resamples of the intervals.
        seed: bootstrap seed.
        viewer: which deep-zoom viewers a scoring output's report builds, and how (default: all slides of a
            report of up to 200, at full resolution).

    Returns:
        The path of ``index.html``.
    """
    src, out = Path(run_or_score_dir), Path(out_dir)
    kind = detect_kind(src)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(src, out, Path(labels_csv) if labels_csv else None, n_boot, seed, viewer or ViewerConfig())
    page = {"train": _train_page, "cv": _cv_page, "score": _score_page}[kind](ctx)
    index = out / "index.html"
    write_text(index, render_page(page))
    log.info("report of %s (%s): %s", src, kind, index)
    return index


# -- shared ------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _save(ctx: _Context, name: str, fig: Any, title: str, caption: str = "", wide: bool = False) -> Plot:
    P.save_figure(fig, ctx.out / "plots" / name)
    return Plot(title, f"plots/{name}", caption, wide)


def _evaluate(ctx: _Context, page: ReportPage, preds: pd.DataFrame, class_names: list[str], what: str,
              ) -> pd.DataFrame | None:
    """Slide (and, where patients have several slides, patient) metrics and their plots."""
    labels = read_labels(ctx.labels_csv, class_names) if ctx.labels_csv else None
    if labels is None and "label" not in preds.columns:
        page.notes.append("No labels: give --labels metadata.csv (slide_id,label[,patient_id]) for metrics.")
        return None
    result, rows = evaluate_frame(preds, class_names, labels, "slide", ctx.n_boot, ctx.seed)
    write_json(ctx.out / "metrics.json", result)
    with atomic_path(ctx.out / "evaluated.csv") as tmp:
        rows.to_csv(tmp, index=False)
    page.metrics.append((f"{what}: slide level", result))
    if "patient_id" in rows.columns and rows["patient_id"].nunique() < len(rows):
        try:
            by_patient, _ = evaluate_frame(preds, class_names, labels, "patient", ctx.n_boot, ctx.seed)
        except LabelTableError as exc:  # slide-level labels that differ within a patient: no patient metrics
            log.warning("no patient-level metrics: %s", exc)
            page.notes.append(f"No patient-level metrics: {exc}")
        else:
            write_json(ctx.out / "metrics_patient.json", by_patient)
            page.metrics.append((f"{what}: patient level (mean probability of a patient's slides)", by_patient))
    y = rows["label"].to_numpy(np.int64)
    probs = rows[[f"prob_{c}" for c in class_names]].to_numpy(np.float64)
    if len(set(y.tolist())) > 1:
        page.plots += [_save(ctx, "roc", P.plot_roc(y, probs, class_names), "ROC", what),
                       _save(ctx, "pr", P.plot_pr(y, probs, class_names), "Precision-recall", what)]
    page.plots.append(_save(ctx, "confusion", P.plot_confusion(result["confusion_matrix"], class_names),
                            "Confusion matrix", what, wide=True))
    if page.calibration is None:
        page.plots.append(_save(ctx, "reliability", P.plot_reliability({"predictions": result["calibration"]}),
                                "Reliability", what))
    return rows


def _calibration(ctx: _Context, page: ReportPage, folds: list[tuple[Path, pd.DataFrame]], class_names: list[str],
                 ) -> None:
    """Before/after temperature scaling of the test slides, T per run folder (fitted on its validation)."""
    prob_cols = [f"prob_{c}" for c in class_names]
    ys, before, after, temps, sources = [], [], [], [], set()
    for folder, test in folds:
        val = pd.read_csv(folder / "val_predictions.csv") if (folder / "val_predictions.csv").is_file() else None
        stored = _stored_temperature(folder)
        try:
            t, source, b, a = temperature_views(None if val is None else val["label"].to_numpy(np.int64),
                                                None if val is None else val[prob_cols].to_numpy(np.float64),
                                                test[prob_cols].to_numpy(np.float64), stored)
        except ValueError as exc:
            log.info("no calibration section for %s: %s", folder, exc)
            return
        ys.append(test["label"].to_numpy(np.int64))
        before.append(b)
        after.append(a)
        temps.append(t)
        sources.add(source if len(folds) == 1 else re.sub(r"\d+ ", "", source))
    if not ys:
        return
    y = np.concatenate(ys)
    source = "; ".join(sorted(sources))
    if len(temps) > 1:
        source += " (mean over folds: " + ", ".join(f"{t:.2f}" for t in temps) + ")"
    before_scores = calibration_scores(y, np.concatenate(before), class_names)
    after_scores = calibration_scores(y, np.concatenate(after), class_names)
    cal: dict[str, Any] = {"temperature": float(np.mean(temps)), "temperatures": temps, "source": source,
                           "evaluated_on": f"{len(y)} test slides", "before": before_scores, "after": after_scores}
    write_json(ctx.out / "calibration.json", json_safe(cal))
    page.calibration = cal
    label_t = f"after (T={cal['temperature']:.2f})"
    fig = P.plot_reliability({"before": before_scores["curve"], label_t: after_scores["curve"]})
    page.plots.append(_save(ctx, "reliability", fig, "Reliability before and after temperature scaling",
                            f"T {source}"))


def _stored_temperature(folder: Path) -> float | None:
    meta = _read_json(folder / "checkpoint_best.json") or {}
    t = meta.get("temperature", (meta.get("calibration") or {}).get("temperature"))
    return float(t) if isinstance(t, (int, float)) else None


def _prediction_cards(rows: pd.DataFrame, class_names: list[str], extra: str = "") -> list[Card]:
    """Cards of a trainer's predictions (labels known, no heatmaps)."""
    cards = []
    for r in rows.to_dict("records"):
        probs = [float(r[f"prob_{c}"]) for c in class_names]
        cards.append(Card(str(r["slide_id"]), probs, class_names[int(np.argmax(probs))],
                          truth=class_names[int(r["label"])], extra=r.get("_fold", extra)))
    return cards


# -- kinds -------------------------------------------------------------------------------------
def _train_page(ctx: _Context) -> ReportPage:
    meta = _read_json(ctx.src / "checkpoint_best.json") or {}
    class_names = [str(c) for c in meta.get("class_names", [])]
    page = ReportPage(f"slidemil report: {ctx.src.name}", "training run", str(ctx.src), class_names)
    curves = pd.read_csv(ctx.src / "metrics.csv")
    best = meta.get("epoch")
    page.plots.append(_save(ctx, "training_curves", P.plot_training_curves(curves, best), "Training curves",
                            f"kept epoch {best}, marked", wide=True))
    page.settings = {n: _read_json(ctx.src / n) for n in ("train_config.json", "test_metrics.json")
                     if (ctx.src / n).is_file()}
    test_csv = ctx.src / "test_predictions.csv"
    if not test_csv.is_file():
        page.notes.append("No test_predictions.csv: the run has no test slides (or has not finished).")
        return page
    preds, names = read_predictions(test_csv)
    page.class_names = class_names = class_names or names
    _calibration(ctx, page, [(ctx.src, preds)], class_names)
    rows = _evaluate(ctx, page, preds, class_names, "test slides")
    page.cards = _prediction_cards(rows if rows is not None else preds, class_names)
    return page


def _cv_page(ctx: _Context) -> ReportPage:
    folds = {int(m.group(1)): p for p in sorted(ctx.src.glob("fold_*")) if (m := _FOLD.match(p.name))}
    page = ReportPage(f"slidemil report: {ctx.src.name}", f"{len(folds)}-fold cross-validation", str(ctx.src), [])
    if (ctx.src / "cv_summary.csv").is_file():
        page.cv_summary = pd.read_csv(ctx.src / "cv_summary.csv")
    curves = {i: pd.read_csv(f / "metrics.csv") for i, f in folds.items() if (f / "metrics.csv").is_file()}
    if curves:
        page.plots.append(_save(ctx, "cv_curves", P.plot_cv_curves(curves), "Validation curves per fold",
                                "thin: folds; thick: mean; band: mean +- std", wide=True))
    tests = {i: read_predictions(f / "test_predictions.csv") for i, f in folds.items()
             if (f / "test_predictions.csv").is_file()}
    if not tests:
        page.notes.append("No fold has test predictions yet.")
        return page
    page.class_names = class_names = next(iter(tests.values()))[1]
    pooled = pd.concat([t.assign(_fold=f"fold {i}") for i, (t, _) in tests.items()], ignore_index=True)
    fold_roc = {i: (t["label"].to_numpy(np.int64), t[[f"prob_{c}" for c in class_names]].to_numpy(np.float64))
                for i, (t, _) in tests.items()}
    page.plots.append(_save(ctx, "cv_roc", P.plot_cv_roc(fold_roc, class_names), "ROC per fold",
                            "test slides of each fold; mean TPR and +- std band"))
    _calibration(ctx, page, [(folds[i], t) for i, (t, _) in tests.items()], class_names)
    _evaluate(ctx, page, pooled.drop(columns="_fold"), class_names, "pooled test slides of all folds")
    page.cards = _prediction_cards(pooled, class_names)
    page.settings = {"train_config.json": _read_json(folds[min(folds)] / "train_config.json")}
    return page


def _score_page(ctx: _Context) -> ReportPage:
    preds, class_names = read_predictions(ctx.src / "predictions.csv")
    page = ReportPage(f"slidemil report: {ctx.src.name}", "scoring output", str(ctx.src), class_names)
    page.settings = {n: _read_json(ctx.src / n) for n in ("score_config.json", "run_summary.json")
                     if (ctx.src / n).is_file()}
    page.notes.append(_score_summary(preds, class_names))
    rows = _evaluate(ctx, page, preds, class_names, "scored slides")
    truth = {} if rows is None else dict(zip(rows["slide_id"], rows["label"]))
    page.cards = _score_cards(ctx, preds, class_names, truth)
    viewers = build_viewers(ctx.src, ctx.out, truth={c.slide_id: c.truth for c in page.cards if c.truth},
                            **dataclasses.asdict(ctx.viewer))
    page.notes += viewers.notes
    for card in page.cards:
        card.viewer = viewers.pages.get(card.slide_id)
    return page


def _score_summary(preds: pd.DataFrame, class_names: list[str]) -> str:
    status = preds["status"].fillna("ok") if "status" in preds.columns else pd.Series("ok", index=preds.index)
    probs = preds.loc[status == "ok", [f"prob_{c}" for c in class_names]].dropna()
    counts = np.bincount(probs.to_numpy().argmax(axis=1), minlength=len(class_names))
    predicted = ", ".join(f"{c} {n}" for c, n in zip(class_names, counts.tolist()))
    return (f"{len(preds)} slides in predictions.csv: {int((status == 'ok').sum())} scored, "
            f"{int((status != 'ok').sum())} failed; predicted {predicted}.")


def _score_cards(ctx: _Context, preds: pd.DataFrame, class_names: list[str], truth: dict[str, int]) -> list[Card]:
    """A card per row of ``predictions.csv``, with thumbnails of the heatmap overlays."""
    cards: list[Card] = []
    jobs: list[tuple[int, Path, Path]] = []
    for r in preds.to_dict("records"):
        sid = str(r["slide_id"])
        status = "ok" if pd.isna(r.get("status")) else str(r.get("status"))
        probs = [None if pd.isna(r.get(f"prob_{c}")) else float(r[f"prob_{c}"]) for c in class_names]
        finite = [p if p is not None else -1.0 for p in probs]
        pred = class_names[int(np.argmax(finite))] if any(p is not None for p in probs) else ""
        if isinstance(r.get("pred_class"), str) and r["pred_class"] in class_names:
            pred = r["pred_class"]
        paths = slide_paths(ctx.src, sid)
        card = Card(sid, probs, pred, truth=class_names[truth[sid]] if sid in truth else None, status=status,
                    error="" if pd.isna(r.get("error")) else str(r.get("error", "")))
        for attr, key in (("heatmap", "png"), ("geojson", "geojson"), ("topk", "topk")):
            if paths[key].exists():
                setattr(card, attr, os.path.relpath(paths[key], ctx.out) + ("/" if key == "topk" else ""))
        if paths["png"].is_file():
            jobs.append((len(cards), paths["png"], ctx.out / "thumbs" / f"{sid}.jpg"))
        cards.append(card)
    sizes = make_thumbnails([(src, dst) for _, src, dst in jobs])
    for (i, _, dst), size in zip(jobs, sizes):
        if size is not None:
            cards[i].thumb, cards[i].thumb_size = os.path.relpath(dst, ctx.out), size
    log.info("%d slides in the gallery, %d thumbnails", len(cards), sum(s is not None for s in sizes))
    return cards
