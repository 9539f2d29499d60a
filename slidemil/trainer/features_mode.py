"""The ``features`` training mode: an attention-MIL head on features cached by ``slidemil extract``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil import config as _config
from slidemil.artifacts.features_folder import resolve_features_folder
from slidemil.errors import ConfigError
from slidemil.models.mil import MILHead, MILOutput
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
from slidemil.trainer.task import Cohort, MILModel, TrainingTask, build_head

log = logging.getLogger(__name__)


class FeatureMIL(MILModel):
    """The features-mode model: per-dimension standardised features into the MIL head.

    The standardisation (training-set mean and std of each feature) is an affine map before the
    head's first linear layer (``head.input_layers``: one per ensemble member), so :meth:`checkpoint_state` folds it
    into those layers: the saved head takes raw features, as the engine gives them.
    """

    feature_mean: torch.Tensor  # buffers, (D,): training-set mean and 1 / std of each feature
    feature_scale: torch.Tensor

    def __init__(self, head: MILHead, standardize: bool = True) -> None:
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
        for layer in self.head.input_layers:  # the Linear layers that see raw features
            w = state[f"{layer}.weight"].double() * self.feature_scale.double().cpu()[None, :]
            b = state[f"{layer}.bias"].double() - w @ self.feature_mean.double().cpu()
            state[f"{layer}.weight"], state[f"{layer}.bias"] = w.float(), b.float()
        return {f"head.{k}": v for k, v in state.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items()})
        self.feature_mean.zero_()
        self.feature_scale.fill_(1.0)


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
