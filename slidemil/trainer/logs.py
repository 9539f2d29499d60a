"""Where the main rank records a run: ``metrics.csv``, TensorBoard, and optionally Weights & Biases.

Each sink takes one dict of scalars per epoch. On resume, ``metrics.csv`` keeps the rows up to the
epoch the run continues from, and TensorBoard purges the later steps, so a resumed run reads as
one run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from slidemil.atomic import atomic_path, write_text
from slidemil.errors import ConfigError

log = logging.getLogger(__name__)

FIRST_COLUMNS = ("epoch", "train_loss")
LAST_COLUMNS = ("lr", "seconds", "bags_per_s")


class MetricsCSV:
    """``metrics.csv``: one row per epoch, rewritten atomically after each epoch."""

    def __init__(self, path: Path, resume_epoch: int = 0) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        if resume_epoch > 0 and path.is_file():
            old = pd.read_csv(path)
            self.rows = [r for r in old.to_dict("records") if int(r["epoch"]) <= resume_epoch]

    def log(self, scalars: Mapping[str, float]) -> None:
        self.rows.append(dict(scalars))
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        middle = [k for k in keys if k not in FIRST_COLUMNS + LAST_COLUMNS]
        columns = [*FIRST_COLUMNS, *middle, *LAST_COLUMNS]
        frame = pd.DataFrame(self.rows).reindex(columns=columns)
        with atomic_path(self.path) as tmp:
            frame.to_csv(tmp, index=False)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under ``OUT/tensorboard`` (``train/...``, ``val/...``, ``test/...``)."""

    def __init__(self, folder: Path, resume_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_epoch + 1 if resume_epoch else None)

    def log(self, scalars: Mapping[str, float], step: int, prefix: str = "") -> None:
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not math.isnan(float(value)):
                self.writer.add_scalar(prefix + _tb_name(key), float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tb_name(key: str) -> str:
    for prefix in ("val_", "train_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


class WandbSink:
    """Weights & Biases run (optional dependency; ``WANDB_MODE=offline`` is honoured by wandb)."""

    def __init__(self, out: Path, project: str, run_name: str | None, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("--wandb needs the wandb package: pip install 'slidemil[wandb]'") from exc
        id_file = out / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        write_text(id_file, run_id)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(out),
                              config=dict(config))

    def log(self, scalars: Mapping[str, float], step: int, prefix: str = "") -> None:
        self.run.log({prefix + _tb_name(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """All sinks of the main rank; a do-nothing log on other ranks."""

    def __init__(self, out: Path, enabled: bool, resume_epoch: int, tensorboard: bool, wandb: bool,
                 project: str, run_name: str | None, config: Mapping[str, Any]) -> None:
        self.csv = MetricsCSV(out / "metrics.csv", resume_epoch) if enabled else None
        self.sinks: Sequence[Any] = []
        if enabled and tensorboard:
            self.sinks = [*self.sinks, TensorBoardSink(out / "tensorboard", resume_epoch)]
        if enabled and wandb:
            self.sinks = [*self.sinks, WandbSink(out, project, run_name, config)]

    def epoch(self, scalars: Mapping[str, float]) -> None:
        if self.csv is not None:
            self.csv.log(scalars)
        step = int(scalars["epoch"])
        for sink in self.sinks:
            sink.log({k: v for k, v in scalars.items() if k != "epoch"}, step)

    def final(self, scalars: Mapping[str, float], step: int, prefix: str) -> None:
        for sink in self.sinks:
            sink.log(scalars, step, prefix)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
