"""The one place a slide becomes a grid of tiles: tissue detection, then the tile grid (``plan_tiles``).

``slidemil tile`` (:mod:`slidemil.tile`), feature extraction and the engine all call ``plan_tiles``, so
that tiling never differs between training and scoring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import NoTissueError
from slidemil.slide.grid import TileGrid, TileSpec, make_grid
from slidemil.slide.reader import SlideReader
from slidemil.slide.store import CoordsAttrs
from slidemil.slide.tissue import TissueConfig, TissueMask, detect_tissue

log = logging.getLogger(__name__)

LOW_COVERAGE = 0.9  # below this share of the detected tissue under tiles, a slide's tiling is warned about


@dataclass(frozen=True)
class TilingConfig:
    """Everything that decides a slide's tiles."""

    tile: TileSpec = TileSpec()
    tissue: TissueConfig = TissueConfig()


@dataclass(frozen=True)
class TilePlan:
    """A slide's tissue, the thumbnail it was found on, and its tile grid."""

    tissue: TissueMask
    thumbnail: np.ndarray  # uint8 (h, w, 3) at tissue.mpp
    grid: TileGrid
    attrs: CoordsAttrs


def plan_tiles(reader: SlideReader, cfg: TilingConfig) -> TilePlan:
    """Tissue mask and tile grid of an open slide; a slide without tissue gets an empty grid."""
    try:
        tissue, thumb = detect_tissue(reader, cfg.tissue)
    except NoTissueError as exc:
        log.warning("%s", exc)
        thumb, mpp = reader.thumbnail(mpp=cfg.tissue.thumb_mpp)
        tissue = TissueMask(mask=np.zeros(thumb.shape[:2], bool), mpp=mpp, source="none")
    grid = make_grid(reader.dimensions, reader.mpp, cfg.tile, tissue)
    if grid.tissue_coverage < LOW_COVERAGE:
        log.warning("%s: the tiles cover only %.0f%% of the detected tissue; lower --min-tissue (now %g) or use "
                    "--overlap so that small fragments get tiles", reader.slide_id, 100 * grid.tissue_coverage,
                    cfg.tile.min_tissue)
    attrs = CoordsAttrs.for_grid(grid, cfg.tile, reader.slide_id, reader.magnification)
    return TilePlan(tissue=tissue, thumbnail=thumb, grid=grid, attrs=attrs)


def draw_tiling(plan: TilePlan) -> np.ndarray:
    """RGB preview: thumbnail with the tissue contour (green) and the kept tiles (blue)."""
    img = plan.thumbnail.copy()
    scale = plan.grid.slide_mpp / plan.tissue.mpp
    size = plan.grid.patch_size_level0 * scale
    for x, y in plan.grid.coords:
        p0 = (int(round(x * scale)), int(round(y * scale)))
        p1 = (int(round(x * scale + size)) - 1, int(round(y * scale + size)) - 1)
        cv2.rectangle(img, p0, p1, (40, 90, 220), 1)
    contours, _ = cv2.findContours(plan.tissue.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 170, 0), 2)
    return img


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
