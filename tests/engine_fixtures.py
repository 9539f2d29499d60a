"""A small trained model package whose attention follows the lesions of synthetic slides.

The head is fitted, as multiple-instance learning, on bags drawn from one synthetic slide's tiles
(bags with lesion tiles are positive) so that its attention has something real to find; the
package is then exported exactly as `slidemil export` does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from slidemil.artifacts.checkpoint import save_checkpoint
from slidemil.config import to_dict
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.models.backbones import create_backbone, save_backbone
from slidemil.models.mil import HeadConfig, create_head
from slidemil.models.preprocess import UInt8Backbone
from slidemil.slide.readers import open_slide
from slidemil.slide.synth import SlideTruth, write_slide
from slidemil.slide.tiling import TilingConfig, plan_tiles

TILING = TilingConfig()


def lesion_fraction_of_tiles(truth: SlideTruth, coords: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each tile covered by the true lesion mask."""
    d = truth.mask_downsample
    out = np.empty(len(coords), np.float32)
    for i, (x, y) in enumerate(coords):
        out[i] = truth.lesion[y // d:(y + size0) // d, x // d:(x + size0) // d].mean()
    return out


def tile_features(path: Path, backbone: UInt8Backbone) -> tuple[np.ndarray, np.ndarray, int]:
    with open_slide(path) as reader:
        plan = plan_tiles(reader, TILING)
        tiles = reader.read_tiles(plan.grid.coords, plan.grid.patch_size_level0, TILING.tile.patch_size)
    with torch.inference_mode():
        feats = torch.cat([backbone(torch.from_numpy(tiles[i:i + 64])) for i in range(0, len(tiles), 64)])
    return feats.numpy(), plan.grid.coords, plan.grid.patch_size_level0


def fit_head(features: np.ndarray, lesion: np.ndarray, n_classes: int = 2, steps: int = 150) -> torch.nn.Module:
    """MIL on bags of 24 tiles: a bag is positive when it holds a lesion tile."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    head = create_head(HeadConfig(in_dim=features.shape[1], n_classes=n_classes, dropout=0.0))
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    pos, neg = np.flatnonzero(lesion > 0.5), np.flatnonzero(lesion == 0)
    x = torch.from_numpy(features)
    for step in range(steps):
        label = step % 2
        bag = rng.choice(neg, 24, replace=False)
        if label:
            k = int(rng.integers(1, 4))  # one to three lesion tiles among normal ones
            bag[:k] = rng.choice(pos, k)
        out = head(x[bag][None])
        loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([label]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def make_package(root: Path) -> tuple[Path, Path, SlideTruth]:
    """Train on one synthetic slide, export; returns (package dir, a second slide, its truth)."""
    train_slide, test_slide = root / "train.svs", root / "test.svs"
    truth_train = write_slide(train_slide, size=4096, label=1, n_classes=2, lesion_fraction=0.08,
                              rng=np.random.default_rng(11))
    truth_test = write_slide(test_slide, size=4096, label=1, n_classes=2, lesion_fraction=0.12,
                             rng=np.random.default_rng(12))
    torch.manual_seed(0)
    model, card = create_backbone("test_resnet")
    card = save_backbone(model, card, root / "run" / "backbone")
    feats, coords, size0 = tile_features(train_slide, UInt8Backbone(model, card).eval())
    head = fit_head(feats, lesion_fraction_of_tiles(truth_train, coords, size0))
    meta = {"mode": "features", "epoch": 0, "metrics": {}, "class_names": ["normal", "tumour"],
            "head_config": head.config.to_dict(), "backbone_card": card.to_dict(), "backbone_weights": "backbone/",
            "tiling": to_dict(TILING), "train_config": {}}
    ckpt = save_checkpoint(root / "run" / "checkpoint_best", {f"head.{k}": v for k, v in head.state_dict().items()},
                           meta)
    export_checkpoint(ckpt, root / "model", ExportConfig())
    return root / "model", test_slide, truth_test


def make_package_and_slides(root: Path) -> tuple[Path, Path, SlideTruth]:
    """``make_package``, with its second slide alone in ``root/slides`` as ``lesion.svs``."""
    model_dir, test_slide, truth = make_package(root)
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(test_slide, slides / "lesion.svs")
    return model_dir, slides, truth
