"""Tiling grid: which level-0 squares of a slide become tiles.

A ``TileSpec`` says the tile at the target resolution (pixels and mpp); its size in level-0 pixels
follows from the slide's mpp: ``patch_size_level0 = round(patch_size * mpp / slide_mpp)``. A slide
scanned coarser than the target is refused (its tiles would be upsampled) unless ``allow_upsample``.
Tiles lie on a regular grid from the slide's origin, fully inside the slide, row-major. A tile is kept
when the fraction of it covered by tissue is at least ``min_tissue``, or when it holds part of a
tissue region that this rule leaves mostly uncovered (a fragment narrower than a tile would otherwise
get no tile at all). The fraction is exact: it integrates the piecewise-constant mask over the tile's
rectangle (bilinear reading of the integral image). ``TileGrid.tissue_coverage`` is the share of the
detected tissue that the kept tiles cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from slidemil.errors import ConfigError, ResolutionError
from slidemil.slide.tissue import TissueMask

UPSAMPLE_TOLERANCE = 0.1  # a slide up to 10% coarser than the target is read as it is (scanners vary)
FRAGMENT_COVERAGE = 0.5  # a tissue region covered less than this by kept tiles keeps every tile it touches
FRAGMENT_MIN_SHARE = 0.05  # ... that holds at least this share of tissue of that region


@dataclass(frozen=True)
class TileSpec:
    """Tile geometry at the target resolution; ``overlap`` in target pixels, as TRIDENT records it."""

    patch_size: int = 256
    mpp: float = 0.5
    overlap: int = 0
    min_tissue: float = 0.25
    allow_upsample: bool = False

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise ConfigError(f"patch_size {self.patch_size} is too small (>= 8 px)")
        if not 0.05 <= self.mpp <= 64:
            raise ConfigError(f"target mpp {self.mpp} outside 0.05-64 um/px (0.5 is 20x, 0.25 is 40x)")
        if not 0 <= self.overlap < self.patch_size:
            raise ConfigError(f"overlap {self.overlap} must be in [0, patch_size)")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue {self.min_tissue} must be in [0, 1]")

    def size_level0(self, slide_mpp: float) -> int:
        """Tile side in level-0 pixels."""
        return max(1, round(self.patch_size * self.mpp / slide_mpp))

    def stride_level0(self, slide_mpp: float) -> int:
        """Grid step in level-0 pixels."""
        return max(1, round((self.patch_size - self.overlap) * self.mpp / slide_mpp))

    def check_resolution(self, slide_mpp: float) -> None:
        """Refuse a slide scanned coarser than the target (its tiles would be blown up), unless allowed.

        Raises:
            ResolutionError: naming the slide's mpp, the target and the fix.
        """
        if self.allow_upsample or slide_mpp <= self.mpp * (1 + UPSAMPLE_TOLERANCE):
            return
        raise ResolutionError(
            f"the slide is scanned at {slide_mpp:.4g} um/px, coarser than the target {self.mpp:g} um/px: each "
            f"{self.patch_size} px tile would be {self.size_level0(slide_mpp)} slide pixels blown up "
            f"{slide_mpp / self.mpp:.1f}x. Tile at the slide's resolution or coarser (--mpp {slide_mpp:.4g}; a "
            "model scores at the mpp it was trained at), or pass --allow-upsample if you mean it")


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide. ``cells[i]`` is tile i's (row, col) on the ``shape`` grid."""

    coords: np.ndarray  # int64 (N, 2) level-0 top-left (x, y)
    cells: np.ndarray  # int64 (N, 2) (row, col)
    shape: tuple[int, int]  # (rows, cols) of the full grid, tissue or not
    patch_size_level0: int
    stride_level0: int
    slide_mpp: float
    level0_size: tuple[int, int]  # (width, height)
    tissue_fraction: np.ndarray  # float32 (N,)
    tissue_coverage: float = float("nan")  # share of the detected tissue the tiles cover (nan: unknown)

    def __len__(self) -> int:
        return len(self.coords)

    def to_grid(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-tile ``values`` (N,) onto a (rows, cols) float32 array, ``fill`` elsewhere."""
        values = np.asarray(values)
        assert values.shape == (len(self),), f"values must be ({len(self)},), got {values.shape}"
        out = np.full(self.shape, fill, dtype=np.float32)
        out[self.cells[:, 0], self.cells[:, 1]] = values
        return out


def _integral(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return out


def _integral_at(integral: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear reading of an integral image: exact area integral of a piecewise-constant mask."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    y, x = np.clip(y, 0, h), np.clip(x, 0, w)
    y0, x0 = np.minimum(np.floor(y).astype(int), h - 1), np.minimum(np.floor(x).astype(int), w - 1)
    y0, x0 = np.maximum(y0, 0), np.maximum(x0, 0)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * integral[y0, x0] + (1 - fy) * fx * integral[y0, x0 + 1]
            + fy * (1 - fx) * integral[y0 + 1, x0] + fy * fx * integral[y0 + 1, x0 + 1])


def tissue_fractions(mask: TissueMask, slide_mpp: float, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """Fraction of each square tile (level-0 top-left ``coords``) covered by the mask."""
    scale = slide_mpp / mask.mpp  # mask pixels per level-0 pixel
    integral = _integral(mask.mask)
    x0, y0 = coords[:, 0] * scale, coords[:, 1] * scale
    x1, y1 = (coords[:, 0] + size_level0) * scale, (coords[:, 1] + size_level0) * scale
    area = (_integral_at(integral, y1, x1) - _integral_at(integral, y0, x1)
            - _integral_at(integral, y1, x0) + _integral_at(integral, y0, x0))
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def covered_by_tiles(shape: tuple[int, int], mask_mpp: float, slide_mpp: float, coords: np.ndarray,
                     size_level0: int) -> np.ndarray:
    """Bool (h, w) at mask resolution: the pixels that tiles at level-0 ``coords`` cover (summed-area painting)."""
    h, w = shape
    scale = slide_mpp / mask_mpp
    count = np.zeros((h + 1, w + 1), np.int32)
    x0, y0 = (np.clip(np.round(coords[:, i] * scale).astype(np.int64), 0, n) for i, n in ((0, w), (1, h)))
    x1, y1 = (np.clip(np.round((coords[:, i] + size_level0) * scale).astype(np.int64), 0, n) for i, n in ((0, w), (1, h)))
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(count, (ys, xs), sign)
    return count.cumsum(0).cumsum(1)[:h, :w] > 0


def tissue_coverage(tissue: TissueMask, slide_mpp: float, coords: np.ndarray, size_level0: int) -> float:
    """Share of the tissue mask that tiles at ``coords`` cover (1.0 for a slide without tissue)."""
    total = int(tissue.mask.sum())
    if total == 0:
        return 1.0
    covered = covered_by_tiles(tissue.mask.shape, tissue.mpp, slide_mpp, coords, size_level0)
    return float((tissue.mask & covered).sum() / total)


def fragment_tiles(tissue: TissueMask, slide_mpp: float, coords: np.ndarray, size_level0: int,
                   keep: np.ndarray) -> np.ndarray:
    """Tiles to add for tissue regions that the kept tiles cover less than ``FRAGMENT_COVERAGE`` of.

    Each such region (a connected component of the mask) gets every tile holding at least
    ``FRAGMENT_MIN_SHARE`` of a tile's area of it, or, where none does, the tile holding most of it.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue.mask.astype(np.uint8), connectivity=8)
    add = np.zeros(len(coords), bool)
    if n <= 1:
        return add
    covered = covered_by_tiles(tissue.mask.shape, tissue.mpp, slide_mpp, coords[keep], size_level0)
    area = np.bincount(labels.ravel(), minlength=n)
    covered_area = np.bincount(labels.ravel(), weights=covered.ravel(), minlength=n)
    scale = tissue.mpp / slide_mpp  # level-0 px per mask pixel
    poor = np.flatnonzero(covered_area < FRAGMENT_COVERAGE * area)
    for c in poor[poor > 0]:  # label 0 is the background
        x, y, w, h = (int(v) for v in stats[c, :4])
        near = ((coords[:, 0] + size_level0 > x * scale) & (coords[:, 0] < (x + w) * scale)
                & (coords[:, 1] + size_level0 > y * scale) & (coords[:, 1] < (y + h) * scale))
        if not near.any():
            continue
        region = TissueMask(labels[y:y + h, x:x + w] == c, tissue.mpp, tissue.source)
        share = tissue_fractions(region, slide_mpp, coords[near] - np.array([x, y]) * scale, size_level0)
        chosen = share >= FRAGMENT_MIN_SHARE
        if not chosen.any():
            chosen = share == share.max()
        add[np.flatnonzero(near)[chosen]] = True
    return add & ~keep


def make_grid(level0_size: tuple[int, int], slide_mpp: float, spec: TileSpec, tissue: TissueMask) -> TileGrid:
    """Tiles of a slide of ``level0_size`` (width, height): those with a tissue fraction >= ``spec.min_tissue``,
    and those holding part of a tissue region the first rule leaves mostly uncovered.

    Raises:
        ResolutionError: the slide is coarser than the target mpp (see :meth:`TileSpec.check_resolution`).
    """
    spec.check_resolution(slide_mpp)
    width, height = level0_size
    size0, stride0 = spec.size_level0(slide_mpp), spec.stride_level0(slide_mpp)
    cols = max(0, (width - size0) // stride0 + 1)
    rows = max(0, (height - size0) // stride0 + 1)
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
    coords = cells[:, ::-1] * stride0
    frac = tissue_fractions(tissue, slide_mpp, coords, size0) if len(coords) else np.zeros(0, np.float32)
    keep = frac >= spec.min_tissue - 1e-6 if spec.min_tissue > 0 else np.ones(len(coords), bool)
    if spec.min_tissue > 0 and len(coords):
        keep |= fragment_tiles(tissue, slide_mpp, coords, size0, keep)
    coverage = tissue_coverage(tissue, slide_mpp, coords[keep], size0)
    return TileGrid(coords=np.ascontiguousarray(coords[keep], dtype=np.int64),
                    cells=np.ascontiguousarray(cells[keep], dtype=np.int64), shape=(int(rows), int(cols)),
                    patch_size_level0=size0, stride_level0=stride0, slide_mpp=slide_mpp,
                    level0_size=(int(width), int(height)), tissue_fraction=frac[keep], tissue_coverage=coverage)


def grid_from_coords(coords: np.ndarray, size_level0: int, stride_level0: int, level0_size: tuple[int, int],
                     slide_mpp: float) -> TileGrid:
    """Rebuild a ``TileGrid`` from stored coords (e.g. an h5 file), for heatmaps."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    cells = coords[:, ::-1] // stride_level0
    width, height = level0_size
    shape = (max(0, (height - size_level0) // stride_level0 + 1), max(0, (width - size_level0) // stride_level0 + 1))
    return TileGrid(coords=coords, cells=np.ascontiguousarray(cells), shape=shape, patch_size_level0=size_level0,
                    stride_level0=stride_level0, slide_mpp=slide_mpp, level0_size=(int(width), int(height)),
                    tissue_fraction=np.ones(len(coords), np.float32))
