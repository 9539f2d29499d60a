"""The recipe of one training run on one split: build the task, set up, train, calibrate, choose the
operating point, test, clean up.

:func:`train_one` is what ``run_training`` does for a single split and what cross-validation does
for each fold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from slidemil.errors import ConfigError
from slidemil.trainer.calibrate import calibrate_best
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.distributed import DistContext
from slidemil.trainer.inits import choose_init
from slidemil.trainer.loop import Callback, RunResult, Trainer
from slidemil.trainer.operating import choose_for_best
from slidemil.trainer.rng import seed_everything
from slidemil.trainer.task import Cohort, TrainingMode

log = logging.getLogger(__name__)


def train_one(cfg: TrainConfig, out: Path, mode: TrainingMode, cohort: Cohort, split: pd.Series,
              ctx: DistContext, resume: bool, callbacks: Sequence[Callback] = ()) -> RunResult:
    """The recipe for one split: build the task (model initialised from ``cfg.seed``), train, keep one of
    several initialisations (``model.inits``), calibrate (with ``cfg.calibrate``), choose the operating point
    on the validation slides, test."""
    seed_everything(cfg.seed)
    task = mode.build_task(cfg, cohort, split)
    trainer = Trainer(cfg, task, cohort, out, ctx, callbacks)
    try:
        trainer.setup(resume)
        trainer.train()
        trainer.use_best()
        choose_init(trainer)
        if cfg.calibrate:
            trainer.calibration = calibrate_best(trainer)
        trainer.operating_point = choose_for_best(trainer)
        return trainer.test()
    finally:
        trainer.cleanup()


def check_split(split: pd.Series, where: str = "") -> None:
    counts = split.value_counts()
    if counts.get("train", 0) == 0:
        raise ConfigError(f"{where}no training slides in the split ({counts.to_dict()})")
    for part in ("val", "test"):
        if counts.get(part, 0) == 0:
            log.warning("%sno %s slides in the split", where, part)
