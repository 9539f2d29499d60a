"""Training modes: what one loop trains on. ``features`` trains a head on cached features.

A mode validates its cohort (:meth:`TrainingMode.load_cohort`) and builds a :class:`TrainingTask`:
a :class:`MILModel` ``BagBatch -> MILOutput`` whose checkpoint weights are keyed ``head.*`` (and
``backbone.*`` for a model that trains its backbone), datasets for train/val/test, and what the
checkpoint must record about the backbone. The end-to-end mode (:mod:`slidemil.trainer.end2end`)
registers itself here with its own tile-bag dataset and a backbone + head model; the loop,
checkpoints, metrics and DDP are shared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from slidemil import config as _config
from slidemil.artifacts.features_folder import resolve_features_folder
from slidemil.errors import ConfigError
from slidemil.models.mil import AttentionMIL, HeadConfig, MILOutput, create_head
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.data import (
    BagBatch,
    BagDataset,
    FeatureBagDataset,
    LabelTable,
    check_classes,
    check_feature_files,
    raise_problems,
    read_label_table,
)
from slidemil.trainer.distributed import DistContext, all_reduce_sum, shard

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


MODES: dict[str, Callable[[], TrainingMode]] = {}


def register_mode(name: str) -> Callable[[Callable[[], TrainingMode]], Callable[[], TrainingMode]]:
    """Register a training mode factory under ``name`` (``--mode NAME``)."""
    def decorator(factory: Callable[[], TrainingMode]) -> Callable[[], TrainingMode]:
        MODES[name] = factory
        return factory
    return decorator


def get_mode(name: str) -> TrainingMode:
    from slidemil.trainer import end2end  # noqa: F401  (registers "end2end")
    if name not in MODES:
        raise ConfigError(f"unknown training mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]()


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

    def watch_instances(self) -> None:
        """Keep, from now on, the instance projection of each forward, for :meth:`instance_logits`."""
        head = self._attention_head()
        self._instances: torch.Tensor | None = None

        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._instances = output

        head.projection.register_forward_hook(keep)

    def instance_logits(self) -> torch.Tensor:
        """Per-tile logits (B, N, C) of the last forward (after :meth:`watch_instances`).

        The head's classifier is linear and the attention weights sum to 1, so the bag logits are
        exactly the attention-weighted mean of these: they need no parameters of their own, and
        the exported head stays as it is.
        """
        head = self._attention_head()
        assert self._instances is not None, "instance_logits() needs watch_instances() and a forward"
        return head.classifier(self._instances) / head.temperature

    def _attention_head(self) -> AttentionMIL:
        head = getattr(self, "head", None)
        if not isinstance(head, AttentionMIL):
            raise ConfigError(f"{type(self).__name__} has no attention-MIL head")
        return head

    def set_temperature(self, temperature: float) -> None:
        """Store a calibration temperature in the head (it divides the logits)."""
        head = getattr(self, "head", None)
        if not isinstance(head, AttentionMIL):
            raise ConfigError(f"{type(self).__name__} has no attention-MIL head to calibrate")
        head.temperature.fill_(float(temperature))


class FeatureMIL(MILModel):
    """The features-mode model: per-dimension standardised features into the attention-MIL head.

    The standardisation (training-set mean and std of each feature) is an affine map before the
    head's first linear layer, so :meth:`checkpoint_state` folds it into that layer: the saved head
    takes raw features, as the engine gives them.
    """

    feature_mean: torch.Tensor  # buffers, (D,): training-set mean and 1 / std of each feature
    feature_scale: torch.Tensor

    def __init__(self, head: AttentionMIL, standardize: bool = True) -> None:
        super().__init__()
        self.head = head
        self.standardize = standardize
        self.register_buffer("feature_mean", torch.zeros(head.in_dim))
        self.register_buffer("feature_scale", torch.ones(head.in_dim))

    def forward(self, batch: BagBatch) -> MILOutput:
        """features (B, N, D) + mask (B, N) -> MILOutput."""
        return self.head((batch.inputs - self.feature_mean) * self.feature_scale, batch.mask)

    @torch.no_grad()
    def prepare(self, train: BagDataset, ctx: DistContext) -> None:
        if not self.standardize:
            return
        sums = np.zeros((3, self.head.in_dim))
        for i in shard(len(train), ctx):
            x = train[(i, 1)].inputs.double().numpy()  # the tiles of epoch 1
            sums += [x.sum(0), (x * x).sum(0), np.full(x.shape[1], len(x))]
        sums = np.asarray(all_reduce_sum(sums.ravel().tolist(), ctx)).reshape(3, -1)
        mean = sums[0] / sums[2]
        std = np.sqrt(np.maximum(sums[1] / sums[2] - mean**2, 0.0))
        live = std[std > 0]
        floor = max(1e-6, 1e-2 * float(np.median(live))) if len(live) else 1.0
        self.feature_mean.copy_(torch.from_numpy(mean))
        self.feature_scale.copy_(torch.from_numpy(1.0 / np.maximum(std, floor)))
        log.info("standardising %d-d features (std %.3g..%.3g; folded into the head when saved)",
                 len(mean), std.min(), std.max())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        w = state["projection.0.weight"].double() * self.feature_scale.double().cpu()[None, :]
        b = state["projection.0.bias"].double() - w @ self.feature_mean.double().cpu()
        state["projection.0.weight"], state["projection.0.bias"] = w.float(), b.float()
        return {f"head.{k}": v for k, v in state.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items()})
        self.feature_mean.zero_()
        self.feature_scale.fill_(1.0)


def build_head(cfg: TrainConfig, in_dim: int, n_classes: int) -> AttentionMIL:
    """The head the config describes (initialised from the current torch seed)."""
    m = cfg.model
    return create_head(HeadConfig(mil_type=m.mil, in_dim=in_dim, n_classes=n_classes, hidden_dim=m.hidden_dim,
                                  attention_dim=m.attention_dim, dropout=m.dropout))


@register_mode("features")
class FeaturesMode:
    """Train the attention-MIL head on features cached by ``slidemil extract``."""

    def load_cohort(self, cfg: TrainConfig) -> Cohort:
        d = cfg.data
        if not d.metadata or not d.features:
            raise ConfigError("features mode needs --metadata CSV and --features DIR")
        if not Path(d.features).is_dir():
            raise ConfigError(f"features folder {d.features} does not exist")
        folder = resolve_features_folder(Path(d.features))
        card, weights = folder.backbone()
        labels, problems = read_label_table(d.metadata, d.class_names)
        index = check_feature_files(labels.table.index.tolist(), folder, d.skip_missing,
                                    card.weights_sha256 if card else None, problems)
        if card is not None and index.feature_dim and index.feature_dim != card.feature_dim:
            problems.append(f"the feature files are {index.feature_dim}-d but {folder.records}/backbone records "
                            f"{card.name!r} with {card.feature_dim}-d features; the h5 files come from another "
                            "backbone: extract them again into a new folder")
        kept = labels.table.loc[[s for s in labels.table.index if s in index.paths or not d.skip_missing]]
        labels = LabelTable(kept, labels.class_names)
        check_classes(labels, problems)
        raise_problems(problems, str(d.metadata))
        n_tiles = np.array([index.n_tiles[s] for s in kept.index])
        log.info("cohort: %d slides, %d classes %s, %d-d features, %d-%d tiles per slide (median %d)",
                 len(kept), len(labels.class_names), list(labels.class_names), index.feature_dim,
                 n_tiles.min(), n_tiles.max(), int(np.median(n_tiles)))
        return Cohort(labels, index.paths, index.feature_dim,
                      extra={"backbone_card": card, "backbone_weights": weights, "features_folder": folder,
                             "tiling": _config.to_dict(tiling) if (tiling := folder.tiling()) else None})

    def build_task(self, cfg: TrainConfig, cohort: Cohort, split: pd.Series) -> TrainingTask:
        folder = cohort.extra["features_folder"]
        card, weights = cohort.extra["backbone_card"], cohort.extra["backbone_weights"]
        head = build_head(cfg, cohort.in_dim, len(cohort.class_names))
        datasets = {}
        for part in ("train", "val", "test"):
            ids = split.index[split == part].tolist()
            datasets[part] = FeatureBagDataset(
                ids, [cohort.paths[s] for s in ids], cohort.table.loc[ids, "label"].to_numpy(),
                max_patches=cfg.data.max_patches if part == "train" else None, seed=cfg.seed,
                cache=cfg.data.cache)
        meta = {"mode": "features", "head_config": head.config.to_dict() if head.config else None,
                "backbone_card": card.to_dict() if card else None, "backbone_weights": weights,
                "tiling": cohort.extra["tiling"]}
        return TrainingTask(FeatureMIL(head, cfg.model.standardize), datasets, meta,
                            backbone_dir=folder.backbone_dir if card else None)
