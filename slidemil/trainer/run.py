"""``slidemil train`` as a library call: validate the cohort, make the splits, run the recipe.

:func:`run_training` works the same in one process and under ``torchrun`` (every rank calls it;
rank 0 writes). With ``cv.folds`` it runs k-fold cross-validation (:mod:`slidemil.trainer.cv`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

from slidemil.errors import LabelTableError
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.cv import run_cv
from slidemil.trainer.distributed import DistContext, process_group
from slidemil.trainer.loop import Callback, RunResult
from slidemil.trainer.modes import get_mode
from slidemil.trainer.recipe import check_split, train_one
from slidemil.trainer.splits import load_splits, save_splits, train_val_test_split
from slidemil.trainer.task import Cohort

log = logging.getLogger(__name__)


def run_training(cfg: TrainConfig, out: str | Path, resume: bool = False,
                 callbacks: Sequence[Callback] = ()) -> list[RunResult]:
    """Train (and test) as ``cfg`` says; outputs in ``out`` (one ``fold_<i>`` folder per fold).

    Args:
        cfg: resolved configuration.
        out: run folder.
        resume: continue from ``checkpoint_last`` where there is one (start fresh where not).
        callbacks: called after every epoch (see :class:`slidemil.trainer.loop.EpochResult`).

    Returns:
        One :class:`RunResult` per run (one, or one per fold run).

    Raises:
        LabelTableError: the label table or feature files have problems (all listed).
        ConfigError: invalid settings, or ``out`` holds a run and ``resume`` is False.
    """
    out = Path(out)
    mode = get_mode(cfg.data.mode)
    with process_group(cfg.device) as ctx, cpu_threads(cfg.threads if ctx.device.type == "cpu" else None):
        cohort = mode.load_cohort(cfg)
        if cfg.cv.folds:
            return run_cv(cfg, out, mode, cohort, ctx, resume, callbacks)
        split = resolve_split(cfg, cohort, out, resume, ctx)
        return [train_one(cfg, out, mode, cohort, split, ctx, resume, callbacks)]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` for the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_split(cfg: TrainConfig, cohort: Cohort, out: Path, resume: bool, ctx: DistContext) -> pd.Series:
    """The table's ``split`` column; else on resume ``out/splits.csv``; else a seeded grouped split.

    Rank 0 saves it as ``out/splits.csv``.
    """
    table = cohort.table
    saved = out / "splits.csv"
    if "split" in table.columns:
        split = table["split"].rename("split")
        log.info("using the split column of %s", cfg.data.metadata)
    elif resume and saved.is_file():
        loaded = load_splits(saved)
        if not isinstance(loaded, pd.Series) or set(loaded.index) != set(table.index):
            raise LabelTableError(f"{saved} does not list the slides of {cfg.data.metadata}; the table changed "
                                  "since the run started: use a new --out")
        split = loaded.reindex(table.index)
    else:
        split = train_val_test_split(table, cfg.data.split_fractions, seed=cfg.seed)
    check_split(split)
    if ctx.is_main:
        save_splits(split, saved)
    return split
