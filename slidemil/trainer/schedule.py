"""Learning-rate schedule: linear warm-up, then cosine, plateau or constant; plain-data state."""

from __future__ import annotations

import math
from typing import Any

import torch

from slidemil.evaluation.metrics import is_better
from slidemil.trainer.config import OptimConfig


class LRSchedule:
    """Sets the learning rate of every parameter group before each optimisation step.

    ``lr(step) = base_lr * warm(step) * shape(step) * plateau_scale``: ``warm`` rises linearly to 1
    over the warm-up steps; ``shape`` is a half cosine from 1 to ``min_lr_ratio`` over the remaining
    steps (``cosine``) or 1; ``plateau_scale`` is multiplied by ``plateau_factor`` after
    ``plateau_patience`` epochs without improvement of the monitored metric (``plateau``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                 monitor: str) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.monitor = monitor
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.warmup_steps = cfg.warmup_epochs * steps_per_epoch
        self.total_steps = max(cfg.epochs * steps_per_epoch, 1)
        self.step_count = 0
        self.scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        self._apply()

    def factor(self) -> float:
        s = self.step_count
        warm = min(1.0, (s + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        shape = 1.0
        if self.cfg.scheduler == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(max((s - self.warmup_steps) / span, 0.0), 1.0)
            r = self.cfg.min_lr_ratio
            shape = r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * shape * self.scale

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        """After each optimisation step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, value: float | None) -> None:
        """After each validation (plateau schedule only)."""
        if self.cfg.scheduler != "plateau" or value is None or math.isnan(value):
            return
        if is_better(self.monitor, value, self.best):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.cfg.plateau_patience:
            self.scale *= self.cfg.plateau_factor
            self.bad_epochs = 0
            self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.scale = float(state["scale"])
        self.best = state["best"]
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()
