"""k-fold cross-validation: patient-grouped, stratified folds, one run folder per fold, a summary.

Every fold is made from the seed, so the same folds come out of every process and every SLURM
array task (``--fold I`` runs fold I only). ``OUT/splits.csv`` lists all folds; fold ``i`` runs in
``OUT/fold_<i>/`` like a single run; ``OUT/cv_summary.csv`` holds the mean and standard deviation
of every test metric over the folds that are complete.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.atomic import atomic_path
from slidemil.errors import ConfigError
from slidemil.evaluation.metrics import flat_metrics
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.distributed import DistContext
from slidemil.trainer.loop import Callback, RunResult
from slidemil.trainer.recipe import check_split, train_one
from slidemil.trainer.splits import kfold_splits, load_splits, save_splits
from slidemil.trainer.task import Cohort, TrainingMode

log = logging.getLogger(__name__)

SUMMARY_FILE = "cv_summary.csv"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


def fold_dir(out: str | Path, fold: int) -> Path:
    return Path(out) / f"fold_{fold}"


def make_folds(cfg: TrainConfig, cohort: Cohort) -> list[pd.Series]:
    """The k seeded folds (a ``split`` column of the table is ignored, with a warning)."""
    if "split" in cohort.table.columns:
        log.warning("--folds: the split column of the table is ignored; the folds define the splits")
    return kfold_splits(cohort.table, cfg.cv.folds, seed=cfg.seed, val_fraction=cfg.data.val_fraction)


def run_cv(cfg: TrainConfig, out: Path, mode: TrainingMode, cohort: Cohort, ctx: DistContext, resume: bool,
           callbacks: Sequence[Callback] = ()) -> list[RunResult]:
    """Run every fold in sequence, or only ``cfg.cv.fold``; then summarise when all folds are done."""
    folds = make_folds(cfg, cohort)
    if ctx.is_main:
        save_splits(folds, out / "splits.csv")
    todo = range(len(folds)) if cfg.cv.fold is None else [cfg.cv.fold]
    results = []
    for i in todo:
        log.info("fold %d of %d", i, len(folds))
        folder = fold_dir(out, i)
        check_split(folds[i], f"fold {i}: ")
        if ctx.is_main:
            save_splits(folds[i], folder / "splits.csv")
        results.append(train_one(cfg, folder, mode, cohort, folds[i], ctx, resume, callbacks))
    if ctx.is_main and all((fold_dir(out, i) / "test_metrics.json").is_file() for i in range(len(folds))):
        write_cv_summary(out)
    return results


def cv_summary(out: str | Path) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1) of every scalar test metric over the finished folds.

    Returns:
        One row per metric: ``metric, mean, std, n_folds, fold_0, fold_1, ...``.

    Raises:
        ConfigError: no fold folder with ``test_metrics.json`` under ``out``.
    """
    out = Path(out)
    per_fold: dict[int, dict[str, float]] = {}
    for folder in sorted(out.iterdir()) if out.is_dir() else []:
        match = _FOLD_DIR.match(folder.name)
        if match and (folder / "test_metrics.json").is_file():
            per_fold[int(match.group(1))] = flat_metrics(json.loads((folder / "test_metrics.json").read_text()))
    if not per_fold:
        raise ConfigError(f"{out} holds no finished fold (fold_<i>/test_metrics.json)")
    expected = _expected_folds(out)
    if expected and len(per_fold) < expected:
        log.warning("summary over %d of %d folds (missing: %s)", len(per_fold), expected,
                    sorted(set(range(expected)) - set(per_fold)))
    table = pd.DataFrame(per_fold).sort_index(axis=1)  # metrics x folds
    table.columns = [f"fold_{i}" for i in table.columns]
    summary = pd.DataFrame({"metric": table.index, "mean": table.mean(axis=1, skipna=True).to_numpy(),
                            "std": table.std(axis=1, ddof=1, skipna=True).to_numpy(),
                            "n_folds": table.notna().sum(axis=1).to_numpy()})
    return pd.concat([summary, table.reset_index(drop=True)], axis=1)


def write_cv_summary(out: str | Path) -> pd.DataFrame:
    """Write ``out/cv_summary.csv`` atomically; returns it."""
    summary = cv_summary(out)
    with atomic_path(Path(out) / SUMMARY_FILE) as tmp:
        summary.to_csv(tmp, index=False)
    for metric in ("auc", "balanced_accuracy", "accuracy"):
        row = summary[summary["metric"] == metric]
        if len(row) and not math.isnan(float(row["mean"].iloc[0])):
            log.info("cv %s: %.4f +- %.4f over %d folds", metric, float(row["mean"].iloc[0]),
                     float(np.nan_to_num(row["std"].iloc[0])), int(row["n_folds"].iloc[0]))
    return summary


def _expected_folds(out: Path) -> int:
    path = out / "splits.csv"
    if not path.is_file():
        return 0
    folds = load_splits(path)
    return len(folds) if isinstance(folds, list) else 0
