"""End-to-end training: the tile backbone learns together with the attention-MIL head.

Registers the ``end2end`` training mode. Bags are uint8 tiles read from the slides
(:mod:`slidemil.trainer.tile_data`), augmented on the training device
(:mod:`slidemil.trainer.augment`), normalised by the one function that does it for every program
(:class:`~slidemil.models.preprocess.UInt8Backbone`), and fed through the backbone into the head.
The loop, metrics, checkpoints, resume, k-fold and DDP are the features mode's.

Checkpoints carry the backbone inside (``backbone.*`` keys, ``"backbone_weights": "inside"``); their
backbone card names the sha256 of the weights saved, and a backbone whose weights changed is marked
``weights_source: "fine-tuned:<source>"`` (it can no longer be fetched by name), so that ``slidemil
export`` and ``slidemil extract --checkpoint`` load exactly the fine-tuned backbone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from slidemil import config as _config
from slidemil.artifacts.tiling_record import load_tiling
from slidemil.errors import ConfigError
from slidemil.models.backbones import BackboneCard, backbone_spec, create_backbone, timm_core
from slidemil.models.mil import MILHead, MILOutput
from slidemil.models.preprocess import UInt8Backbone
from slidemil.models.weights import tensors_sha256
from slidemil.trainer.augment import augment_bags
from slidemil.trainer.config import AugmentConfig, TrainConfig
from slidemil.trainer.data import (
    BagBatch,
    BagDataset,
    LabelTable,
    check_classes,
    raise_problems,
    read_label_table,
)
from slidemil.trainer.task import Cohort, MILModel, TrainingTask, build_head
from slidemil.trainer.tile_data import TileBagDataset, check_tile_sources, slide_entries

log = logging.getLogger(__name__)

FINE_TUNED = "fine-tuned:"  # weights_source prefix of a backbone whose weights training changed


class End2EndMIL(MILModel):
    """uint8 tiles -> backbone -> features -> attention-MIL head, trained as one model.

    Args:
        backbone: features-only model, normalised float (B, 3, H, W) -> (B, D).
        card: its preprocessing card (mean, std; the sha256 of the weights it started from).
        head: the MIL head.
        augment: training-time tile augmentation.
        seed: seed of the augmentation draws (with the epoch and the slide).
        chunk: tiles per backbone forward where no gradient flows into the backbone.
        batchnorm: ``frozen`` keeps every BatchNorm layer in eval mode (see
            :class:`~slidemil.trainer.config.BackboneConfig`); ``train`` only those of frozen parts.
    """

    def __init__(self, backbone: nn.Module, card: BackboneCard, head: MILHead, augment: AugmentConfig,
                 seed: int = 0, chunk: int = 256, batchnorm: str = "frozen") -> None:
        super().__init__()
        self.encoder = UInt8Backbone(backbone, card)
        self.head = head
        self.card = card
        self.augment, self.seed, self.chunk, self.batchnorm = augment, seed, chunk, batchnorm
        self.epoch = 0

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def train(self, mode: bool = True) -> End2EndMIL:
        """Frozen parts of the backbone (and, with ``batchnorm="frozen"``, every BatchNorm layer) stay
        in eval mode: their running statistics do not move."""
        super().train(mode)
        for module in frozen_modules(self.backbone, self.batchnorm == "frozen"):
            module.eval()
        return self

    def forward(self, batch: BagBatch) -> MILOutput:
        """tiles uint8 (B, N, H, W, 3) + mask (B, N) -> MILOutput; padding never reaches the backbone."""
        tiles, mask = batch.inputs, batch.mask
        assert tiles.dim() == 5 and tiles.dtype == torch.uint8 and tiles.shape[-1] == 3, (tiles.dtype, tiles.shape)
        flat = tiles[mask]  # (M, H, W, 3): the real tiles, bag after bag
        if self.training and self.augment.enabled:
            keys = [(self.seed, self.epoch, i) for i in batch.indices.tolist()]
            flat = augment_bags(flat, mask.sum(1).tolist(), keys, self.augment)
        features = self.encode(flat)  # (M, D) float32
        bags = features.new_zeros((*mask.shape, features.shape[-1]))
        bags[mask] = features
        return self.head(bags, mask)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (M, H, W, 3) -> float32 (M, D); in chunks, without a graph, where no gradient is needed."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()):
            return self.encoder(tiles)
        with torch.no_grad():
            return torch.cat([self.encoder(tiles[i:i + self.chunk]) for i in range(0, len(tiles), self.chunk)])

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {f"backbone.{k}": v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        state.update({f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.backbone.load_state_dict(_part(state, "backbone."))
        self.head.load_state_dict(_part(state, "head."))

    def checkpoint_meta(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"backbone_card": fine_tuned_card(self.card, _part(state, "backbone.")).to_dict()}


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fine_tuned_card(card: BackboneCard, backbone_state: Mapping[str, torch.Tensor]) -> BackboneCard:
    """The card of ``backbone_state``: the same card while the weights are unchanged, else the new
    sha256 and ``weights_source`` ``fine-tuned:<source>`` (no longer fetchable by name)."""
    sha = tensors_sha256(backbone_state)
    if sha == card.weights_sha256:
        return card
    source = card.weights_source if card.weights_source.startswith(FINE_TUNED) else FINE_TUNED + card.weights_source
    return dataclasses.replace(card, weights_sha256=sha, weights_source=source)


# --- what trains ---------------------------------------------------------------------------------

def freeze(backbone: nn.Module, until: str | None = None, everything: bool = False) -> int:
    """Stop gradients into the whole backbone, or into its parameters up to and including module ``until``
    (in the order the model defines them: ``layer3`` of a ResNet leaves ``layer4`` trainable).

    Returns:
        The number of parameter tensors frozen.

    Raises:
        ConfigError: ``until`` is not a module with parameters (the message lists the choices).
    """
    params = list(backbone.named_parameters())
    cut = len(params) if everything else 0
    if until and not everything:
        modules = dict(backbone.named_modules())
        candidates = (until, f"trunk.{until}")  # a wrapped timm model's parts live under trunk.
        name = next((n for n in candidates if n in modules and any(True for _ in modules[n].parameters())), None)
        if name is None:
            raise ConfigError(f"--freeze-until {until!r} is not a part of backbone {type(backbone).__name__}; "
                              f"choose one of: {stage_names(backbone)}")
        cut = 1 + max(i for i, (n, _) in enumerate(params) if n.startswith(f"{name}."))
    for _, p in params[:cut]:
        p.requires_grad_(False)
    return cut


def stage_names(backbone: nn.Module) -> str:
    """The top-level parts of a backbone that hold parameters (with the range of a container's children)."""
    core = timm_core(backbone)
    prefix = "" if core is backbone else "trunk."
    names = []
    for name, child in core.named_children():
        if not any(True for _ in child.parameters()):
            continue
        n = len(child) if isinstance(child, (nn.Sequential, nn.ModuleList)) else 0
        names.append(f"{prefix}{name} ({prefix}{name}.0 .. {prefix}{name}.{n - 1})" if n > 1 else prefix + name)
    return ", ".join(names)


def frozen_modules(backbone: nn.Module, batchnorm: bool = False) -> list[nn.Module]:
    """Modules whose parameters are all frozen (kept in eval mode while training), and every
    BatchNorm layer when ``batchnorm``."""
    out = []
    for module in backbone.modules():
        params = list(module.parameters())
        if (params and not any(p.requires_grad for p in params)) or (
                batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            out.append(module)
    return out


def enable_grad_checkpointing(backbone: nn.Module) -> None:
    """timm's activation checkpointing, where the model has it."""
    core = timm_core(backbone)
    enable = getattr(core, "set_grad_checkpointing", None)
    if not callable(enable):
        log.warning("--grad-checkpointing: %s has no set_grad_checkpointing; training without it", type(core).__name__)
        return
    enable(True)


def param_groups(model: End2EndMIL, lr: float, backbone_lr: float | None) -> list[dict[str, Any]]:
    """Head and trainable backbone parameters as two AdamW groups with their own learning rates."""
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": lr, "name": "head"},
              {"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr": backbone_lr or lr, "name": "backbone"}]
    return [g for g in groups if g["params"]]


# --- the mode ------------------------------------------------------------------------------------

class End2EndMode:
    """Train backbone and head on tiles read from the slides at the coordinates of ``slidemil tile``."""

    def load_cohort(self, cfg: TrainConfig) -> Cohort:
        d = cfg.data
        if not d.metadata or not d.coords:
            raise ConfigError("end2end mode needs --metadata CSV and --coords DIR (the output of `slidemil tile`)")
        coords_dir = Path(d.coords)
        if not coords_dir.is_dir():
            raise ConfigError(f"coords folder {coords_dir} does not exist")
        backbone_spec(cfg.backbone.name)  # an unknown name fails before any data is looked at
        tiling = load_tiling(coords_dir)
        labels, problems = read_label_table(d.metadata, d.class_names)
        entries = slide_entries(labels.table, d.metadata, d.slides, coords_dir)
        index = check_tile_sources(labels.table.index.tolist(), coords_dir, entries, d.skip_missing, problems)
        kept = labels.table.loc[[s for s in labels.table.index if s in index.sources or not d.skip_missing]]
        labels = LabelTable(kept, labels.class_names)
        check_classes(labels, problems)
        if index.patch_size and index.patch_size != tiling.tile.patch_size:
            problems.append(f"the coords files hold {index.patch_size} px tiles but {coords_dir}/tiling_config.json "
                            f"says {tiling.tile.patch_size} px; tile again into a new folder")
        raise_problems(problems, str(d.metadata))
        n_tiles = np.array([index.n_tiles[s] for s in kept.index])
        log.info("cohort: %d slides, %d classes %s, %d px tiles, %d-%d tiles per slide (median %d)", len(kept),
                 len(labels.class_names), list(labels.class_names), index.patch_size, n_tiles.min(), n_tiles.max(),
                 int(np.median(n_tiles)))
        return Cohort(labels, {s: src.coords for s, src in index.sources.items()}, in_dim=0,
                      extra={"sources": index.sources, "tiling": _config.to_dict(tiling)})

    def build_task(self, cfg: TrainConfig, cohort: Cohort, split: pd.Series) -> TrainingTask:
        b = cfg.backbone
        backbone, card = create_backbone(b.name, b.weights)
        head = build_head(cfg, card.feature_dim, len(cohort.class_names))
        n_frozen = freeze(backbone, b.freeze_until, b.freeze)
        if b.grad_checkpointing:
            enable_grad_checkpointing(backbone)
        if b.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        model = End2EndMIL(backbone, card, head, cfg.augment, cfg.seed, b.chunk, b.batchnorm)
        n_params = len(list(backbone.parameters()))
        log.info("end2end: backbone %s (%d-d), %d of %d parameter tensors trainable, lr head %.3g, backbone %.3g",
                 card.name, card.feature_dim, n_params - n_frozen, n_params, cfg.optim.lr, b.lr or cfg.optim.lr)
        datasets: dict[str, BagDataset] = {}
        for part in ("train", "val", "test"):
            ids = split.index[split == part].tolist()
            datasets[part] = TileBagDataset(
                ids, [cohort.extra["sources"][s] for s in ids], cohort.table.loc[ids, "label"].to_numpy(),
                max_patches=cfg.data.max_patches if part == "train" else cfg.data.eval_patches, seed=cfg.seed)
        meta = {"mode": "end2end", "head_config": head.config.to_dict() if head.config else None,
                "backbone_card": card.to_dict(), "backbone_weights": "inside", "tiling": cohort.extra["tiling"]}
        return TrainingTask(model, datasets, meta, backbone_dir=None,
                            param_groups=param_groups(model, cfg.optim.lr, b.lr))
