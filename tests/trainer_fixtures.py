"""Hand-made feature cohorts for the trainer tests: small random bags, written as real h5 files.

Negative bags hold instances from N(0, 1); positive bags hold a few instances shifted along a
fixed direction (the "lesion"), like a slide whose lesion covers a few tiles.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.config import save_config
from slidemil.slide.store import CoordsAttrs, write_h5
from slidemil.slide.tiling import TilingConfig

DIM = 96  # the width of the test_resnet backbone whose card the cohorts record


def coords_attrs(slide_id: str) -> CoordsAttrs:
    return CoordsAttrs(patch_size=256, patch_size_level0=256, patch_level=0, level0_magnification=20.0,
                       target_magnification=20.0, overlap=0, level0_width=8192, level0_height=6144, mpp=0.5,
                       slide_mpp=0.5, name=slide_id)


def write_bag(path: Path, slide_id: str, features: np.ndarray, sha: str | None = None) -> None:
    n = len(features)
    coords = np.stack([np.arange(n) * 256 % 8192, np.arange(n) * 256 // 8192 * 256], axis=1)
    extra = {"weights_sha256": sha} if sha else None
    write_h5(path, coords, coords_attrs(slide_id), features.astype(np.float32), encoder="test_resnet",
             feature_attrs=extra)


@functools.lru_cache(maxsize=1)
def _backbone():  # type: ignore[no-untyped-def]
    from slidemil.models.backbones import create_backbone
    torch.manual_seed(0)
    return create_backbone("test_resnet", "random")


def make_feature_cohort(root: str | Path, n_slides: int = 24, n_classes: int = 2, dim: int = DIM,
                        tiles: tuple[int, int] = (30, 70), n_lesion: int = 4, shift: float = 1.5,
                        seed: int = 0, slides_per_patient: int = 2, backbone: bool = True,
                        patient_shift: float = 0.0, slide_wide: bool = False) -> Path:
    """Write ``root/features/<id>.h5``, ``root/backbone/``, ``root/tiling_config.json`` and
    ``root/metadata.csv`` (slide_id, label, patient_id); returns ``root``. ``patient_shift`` > 0 adds to
    every tile of a patient's slides one offset drawn per patient (sd ``patient_shift`` per feature, drawn
    from its own generator so that the other draws do not change): a look that all of a patient's tiles
    share, as stain and scanner give. ``slide_wide``: the class shows in every tile of a slide (as a tumour
    subtype does), not in ``n_lesion`` of them."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_classes, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sha = None
    if backbone:
        from slidemil.models.backbones import save_backbone
        model, card = _backbone()
        sha = save_backbone(model, card, root / "backbone").weights_sha256
    save_config(TilingConfig(), root / "tiling_config.json")
    rows = []
    n_patients = -(-n_slides // slides_per_patient)
    patient_labels = np.arange(n_patients) % n_classes
    offsets = np.random.default_rng([seed, 1]).normal(0.0, patient_shift, size=(n_patients, dim))
    for i in range(n_slides):
        sid = f"slide_{i:03d}"
        label = int(patient_labels[i // slides_per_patient])
        n = int(rng.integers(*tiles))
        feats = rng.normal(size=(n, dim)) + offsets[i // slides_per_patient]
        if label > 0:
            lesion = np.arange(n) if slide_wide else rng.choice(n, size=n_lesion, replace=False)
            feats[lesion] += shift * np.sqrt(dim) * directions[label]
        write_bag(root / "features" / f"{sid}.h5", sid, feats, sha)
        rows.append({"slide_id": sid, "label": label, "patient_id": f"p{i // slides_per_patient:03d}"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def fast_config(root: Path, **changes):  # type: ignore[no-untyped-def]
    """A TrainConfig for quick tests on a cohort of :func:`make_feature_cohort`."""
    from slidemil.config import load_config
    from slidemil.trainer.config import TrainConfig
    overrides = {"data.metadata": str(root / "metadata.csv"), "data.features": str(root),
                 "log.tensorboard": False, "log.progress": False, "threads": 1, **changes}
    return load_config(TrainConfig, None, overrides)


def assert_same_metrics(a: dict, b: dict) -> None:
    """Equal metric records: numbers within float noise, everything else (confusion matrix) exactly."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):
            assert value == pytest.approx(b[key], nan_ok=True), key
        else:
            assert value == b[key], key
