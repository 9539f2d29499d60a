"""Tissue detection on a low-resolution thumbnail.

``segment_tissue`` is a pure function of an RGB thumbnail and its mpp: HSV saturation with an
Otsu threshold held between a floor and a ceiling, median blur, morphological closing, filling of
small holes and removal of small regions. Sizes are given in microns so that the result does not
depend on the thumbnail's resolution. ``detect_tissue`` adds the slide-level choices: a user mask
image, or the whole slide.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from slidemil.choices import TissueMethod
from slidemil.errors import ConfigError, NoTissueError, SlideOpenError
from slidemil.slide.reader import SlideReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueConfig:
    """Settings of tissue detection (lengths in um, areas in um^2, saturation 0-255)."""

    method: TissueMethod = "otsu"
    thumb_mpp: float = 8.0
    saturation_floor: int = 12
    saturation_ceiling: int = 40
    median_um: float = 24.0
    close_um: float = 24.0
    min_area_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0
    mask_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1.0 <= self.thumb_mpp <= 64.0:
            raise ConfigError(f"tissue thumb_mpp {self.thumb_mpp} outside 1-64 um/px; 8-16 is typical")
        if not 0 <= self.saturation_floor <= self.saturation_ceiling <= 255:
            raise ConfigError("tissue saturation_floor <= saturation_ceiling must lie in 0-255")
        if self.method == "mask" and not self.mask_dir:
            raise ConfigError("tissue method 'mask' needs mask_dir (a folder of <slide_id>_mask.png)")


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask over the whole slide, at ``mpp`` microns per mask pixel."""

    mask: np.ndarray  # bool (h, w)
    mpp: float
    source: str

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def segment_tissue(rgb: np.ndarray, mpp: float, cfg: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail at ``mpp`` um/px."""
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, "rgb must be uint8 (h, w, 3)"
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, min(_odd(cfg.median_um / mpp), 255))
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, cfg.saturation_floor, cfg.saturation_ceiling))
    mask: np.ndarray = (sat > threshold).astype(np.uint8)
    k = _odd(cfg.close_um / mpp)
    if k > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    px_area = mpp * mpp
    mask = _fill_small_holes(mask, cfg.max_hole_um2 / px_area)
    mask = _drop_small_regions(mask, cfg.min_area_um2 / px_area)
    return mask.astype(bool)


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    holes = (mask == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    h, w = mask.shape
    out = mask.copy()
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches_border = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches_border and area <= max_hole_px:
            out[labels == i] = 1
    return out


def _drop_small_regions(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    return keep[labels].astype(np.uint8)


def load_mask_image(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A user's mask image (any size; non-zero = tissue) resized to ``shape`` (h, w)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SlideOpenError(f"{path}: cannot read the tissue mask image")
    return cv2.resize((img > 0).astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def mask_path_for(mask_dir: str | Path, slide_id: str) -> Path:
    """Where a user mask for ``slide_id`` is expected: ``<mask_dir>/<slide_id>_mask.png``."""
    return Path(mask_dir) / f"{slide_id}_mask.png"


def detect_tissue(reader: SlideReader, cfg: TissueConfig = TissueConfig(),
                  thumbnail: tuple[np.ndarray, float] | None = None) -> tuple[TissueMask, np.ndarray]:
    """Tissue mask of a slide by ``cfg.method``; also returns the thumbnail it was made on.

    A user mask in ``cfg.mask_dir`` wins over detection for any method when present.

    Raises:
        NoTissueError: when the mask is empty.
    """
    rgb, mpp = thumbnail if thumbnail is not None else reader.thumbnail(mpp=cfg.thumb_mpp)
    shape = rgb.shape[:2]
    user_mask = mask_path_for(cfg.mask_dir, reader.slide_id) if cfg.mask_dir else None
    if user_mask is not None and user_mask.is_file():
        mask, source = load_mask_image(user_mask, shape), f"mask:{user_mask}"
    elif cfg.method == "mask":
        raise SlideOpenError(f"{reader.slide_id}: no tissue mask at {user_mask}")
    elif cfg.method == "whole":
        mask, source = np.ones(shape, dtype=bool), "whole"
    else:
        mask, source = segment_tissue(rgb, mpp, cfg), "otsu"
    if not mask.any():
        raise NoTissueError(
            f"{reader.slide_id}: no tissue found ({source}); check the slide, give a mask with --mask-dir, "
            "or lower the saturation floor")
    return TissueMask(mask=mask, mpp=mpp, source=source), rgb


def with_mask_dir(cfg: TissueConfig, mask_dir: str | None) -> TissueConfig:
    """``cfg`` with ``mask_dir`` set when one is given."""
    return dataclasses.replace(cfg, mask_dir=mask_dir) if mask_dir else cfg
