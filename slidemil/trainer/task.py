"""What one training loop trains: a :class:`TrainingTask` built by a :class:`TrainingMode` from a cohort.

A mode validates its cohort (:meth:`TrainingMode.load_cohort`) and builds a task: a :class:`MILModel`
``BagBatch -> MILOutput`` whose checkpoint weights are keyed ``head.*`` (and ``backbone.*`` for a model
that trains its backbone), datasets for train/val/test, and what the checkpoint must record about the
backbone. The modes (:mod:`slidemil.trainer.features_mode`, :mod:`slidemil.trainer.end2end`) are listed in
:mod:`slidemil.trainer.modes`; the loop, checkpoints, metrics and DDP are shared.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn

from slidemil.errors import ConfigError
from slidemil.models.ensemble import EnsembleHead
from slidemil.models.mil import HeadConfig, MILHead, create_head
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.data import (
    BagDataset,
    LabelTable,
)
from slidemil.trainer.distributed import DistContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """A validated cohort: the label table plus what the mode needs per slide."""

    labels: LabelTable
    paths: dict[str, Path]
    in_dim: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        return self.labels.table

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.labels.class_names


@dataclass
class TrainingTask:
    """What the loop trains: a model, its datasets, and the checkpoint's record of the backbone.

    Attributes:
        model: ``forward(BagBatch) -> MILOutput`` (see :class:`MILModel`).
        datasets: ``train``, ``val``, ``test`` (a part may be empty).
        meta: checkpoint fields: mode, head_config, backbone_card, backbone_weights, tiling.
        backbone_dir: folder copied to ``OUT/backbone`` (None: nothing to copy).
        param_groups: optimizer parameter groups (None: all trainable parameters, one group).
    """

    model: MILModel
    datasets: Mapping[str, BagDataset]
    meta: dict[str, Any]
    backbone_dir: Path | None = None
    param_groups: list[dict[str, Any]] | None = None


class TrainingMode(Protocol):
    """Validates a cohort and builds the task;."""

    def load_cohort(self, cfg: TrainConfig) -> Cohort: ...

    def build_task(self, cfg: TrainConfig, cohort: Cohort, split: pd.Series) -> TrainingTask: ...


class MILModel(nn.Module):
    """A model the loop trains: ``forward(BagBatch) -> MILOutput``.

    ``state_dict()`` is the exact training state (saved for resume); ``checkpoint_state()`` is what
    the checkpoint's ``.safetensors`` holds (keys ``head.*`` [+ ``backbone.*``]) and what
    :func:`slidemil.artifacts.checkpoint.load_head` gives back.
    """

    def prepare(self, train: BagDataset, ctx: DistContext) -> None:
        """Fit anything data-dependent before the first epoch (not called on resume)."""

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

    def checkpoint_meta(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Checkpoint JSON fields that depend on the weights ``state`` being saved (e.g. a fine-tuned
        backbone's card); merged over the task's meta."""
        return {}

    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch (for draws keyed by the epoch)."""

    def mil_head(self) -> MILHead:
        """The MIL head this model trains (its ``head`` attribute)."""
        head = getattr(self, "head", None)
        if not isinstance(head, MILHead):
            raise ConfigError(f"{type(self).__name__} has no MIL head")
        return head

    def enable_auxiliary_loss(self) -> None:
        """From now on keep, in training forwards, what the head's auxiliary loss needs."""
        self.mil_head().keep_for_loss = True

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The head's auxiliary loss for the bags of the last training forward (None: the head has none);
        see :meth:`slidemil.models.mil.MILHead.auxiliary_loss`."""
        return self.mil_head().auxiliary_loss(labels, k, class_weights)

    def keep_member(self, index: int) -> MILHead:
        """Replace an ensemble head by its member ``index`` (from now on the model is that single head)."""
        head = self.mil_head()
        if not isinstance(head, EnsembleHead):
            raise ConfigError(f"{type(head).__name__} is not an ensemble of heads")
        self.head = head.heads()[index]
        return self.head

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norms are clipped each on its own: an ensemble's members, then the
        rest (a trained backbone); one set for a single head."""
        members = self.mil_head().independent_parameters()
        taken = {id(p) for group in members for p in group}
        rest = [p for p in self.parameters() if id(p) not in taken]
        return [group for group in (*members, rest) if group]

    def set_temperature(self, temperature: float) -> None:
        """Store a calibration temperature in the head (it divides the logits)."""
        self.mil_head().temperature.fill_(float(temperature))


def build_head(cfg: TrainConfig, in_dim: int, n_classes: int) -> MILHead:
    """The head the config describes (initialised from the current torch seed)."""
    m = cfg.model
    contrast = m.contrast_per_head()
    mixed = len(set(contrast)) > 1  # slide_contrast auto: both kinds, one kept on the validation loss
    return create_head(HeadConfig(mil_type=m.mil, in_dim=in_dim, n_classes=n_classes, hidden_dim=m.hidden_dim,
                                  attention_dim=m.attention_dim, dropout=m.dropout, n_heads=m.n_heads,
                                  landmarks=m.landmarks, pinv_iterations=m.pinv_iterations, ensemble=len(contrast),
                                  slide_contrast=contrast[0] and not mixed, member_contrast=contrast if mixed else ()))


