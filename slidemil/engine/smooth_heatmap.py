"""A smooth attention map of the whole slide, interpolated from the tile grid (no extra model run).

``--heatmap-overlap`` scores an overlapping grid to get a smoother map; this gets a comparable look
from the grid alone: the (rows, cols) grid is smoothed by normalised convolution (a Gaussian of
``sigma`` tiles over the tiles that exist, so that the empty cells off tissue neither pull values
down nor leave holes), then sampled bilinearly between tile centres at each pixel of an output map
of a fixed size (the thumbnail's, a few pixels per tile). Every value is a convex combination of
tile values, so the map stays within the range of the attention it comes from. Pixels off tissue,
or not between a scored tile's centre and its neighbours' (more than one tile step from any scored
tile centre), are NaN.

Memory stays bounded: the output map is the only array of its size, filled in bands of rows; the
slide's full resolution is never materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slidemil.slide.grid import TileGrid

DEFAULT_SIGMA = 0.5  # tiles
BAND_ROWS = 256  # output rows interpolated at a time
MIN_WEIGHT = 1e-3  # normalised-convolution weight below which a grid cell stays empty


def smooth_grid(values: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised convolution of a (rows, cols) map with NaN where no tile lies.

    Args:
        values: float map, NaN off tissue.
        sigma: Gaussian standard deviation in cells; 0 returns the map as it is.

    Returns:
        ``(smoothed, support)``: the smoothed map (NaN where the support is below ``MIN_WEIGHT``)
        and the Gaussian-weighted share of scored cells around each cell (1 inside tissue).
    """
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values)
    if sigma <= 0 or not known.any():
        return np.where(known, values, np.nan), known.astype(np.float64)
    from scipy.ndimage import gaussian_filter

    weight = gaussian_filter(known.astype(np.float64), sigma, mode="constant", truncate=3.0)
    total = gaussian_filter(np.where(known, values, 0.0), sigma, mode="constant", truncate=3.0)
    smoothed = np.full(values.shape, np.nan)
    ok = weight > MIN_WEIGHT
    smoothed[ok] = total[ok] / weight[ok]
    return smoothed, weight


def _axis(n_out: int, extent: int, size0: int, stride0: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel along one axis: the two grid cells around its centre and the weight of the second.

    Tile centres lie at ``c * stride0 + size0 / 2`` level-0 pixels; outside the first and last centre
    the nearest cell is used alone (weight 0 or 1).
    """
    centre = (np.arange(n_out) + 0.5) * extent / n_out  # level-0 position of each output pixel centre
    u = np.clip((centre - size0 / 2.0) / stride0, 0.0, max(cells - 1, 0))
    c0 = np.floor(u).astype(np.int64)
    c1 = np.minimum(c0 + 1, cells - 1)
    return c0, c1, (u - c0).astype(np.float32)


def smooth_attention_map(grid: TileGrid, values: np.ndarray, out_shape: tuple[int, int],
                         tissue: np.ndarray | None = None, sigma: float = DEFAULT_SIGMA,
                         band_rows: int = BAND_ROWS) -> np.ndarray:
    """Smooth (h, w) float32 map of per-tile ``values`` over the whole slide; NaN off tissue.

    Args:
        grid: the slide's tile grid.
        values: (N,) per-tile values (normalised attention).
        out_shape: (h, w) of the map; it covers the slide's level-0 extent (e.g. the thumbnail's shape).
        tissue: optional bool mask of the slide at any resolution (resized to ``out_shape`` by nearest
            neighbour); pixels outside it are NaN. Without it, only the reach of the tiles limits the map.
        sigma: Gaussian smoothing of the grid in tiles before interpolation (0: bilinear only).
        band_rows: output rows computed at a time (bounds the temporaries to ``band_rows x w``).

    Returns:
        float32 (h, w), NaN off tissue and farther than one tile from any scored tile.
    """
    h, w = int(out_shape[0]), int(out_shape[1])
    out = np.full((h, w), np.nan, dtype=np.float32)
    rows, cols = grid.shape
    if len(grid) == 0 or rows == 0 or cols == 0:
        return out
    raw = grid.to_grid(np.asarray(values, dtype=np.float32))
    known = np.isfinite(raw)  # the interpolation reaches from scored cells only, up to the next cell centre
    smoothed, _ = smooth_grid(raw, sigma)
    filled = np.where(known, smoothed, 0.0).astype(np.float32)
    weight = known.astype(np.float32)
    width0, height0 = grid.level0_size
    c0, c1, fx = _axis(w, width0, grid.patch_size_level0, grid.stride_level0, cols)
    r0_all, r1_all, fy_all = _axis(h, height0, grid.patch_size_level0, grid.stride_level0, rows)
    mask = _mask_rows(tissue, (h, w)) if tissue is not None else None
    for top in range(0, h, max(1, band_rows)):
        bottom = min(h, top + max(1, band_rows))
        r0, r1, fy = r0_all[top:bottom, None], r1_all[top:bottom, None], fy_all[top:bottom, None]
        wts = ((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx)
        cells = ((r0, c0), (r0, c1), (r1, c0), (r1, c1))
        num = np.zeros((bottom - top, w), np.float32)
        den = np.zeros((bottom - top, w), np.float32)
        for wt, (r, c) in zip(wts, cells):
            num += wt * filled[r, c]
            den += wt * weight[r, c]
        band = np.full(den.shape, np.nan, dtype=np.float32)
        ok = den > MIN_WEIGHT
        if mask is not None:
            ok &= mask(top, bottom)
        band[ok] = num[ok] / den[ok]
        out[top:bottom] = band
    return out


def _mask_rows(tissue: np.ndarray, out_shape: tuple[int, int]) -> Callable[[int, int], np.ndarray]:
    """A function (top, bottom) -> bool rows of ``tissue`` resampled to ``out_shape`` by nearest neighbour."""
    tissue = np.asarray(tissue, dtype=bool)
    h, w = out_shape
    th, tw = tissue.shape
    cols = np.minimum(((np.arange(w) + 0.5) * tw / w).astype(np.int64), tw - 1)
    rows = np.minimum(((np.arange(h) + 0.5) * th / h).astype(np.int64), th - 1)

    def band(top: int, bottom: int) -> np.ndarray:
        return tissue[rows[top:bottom, None], cols[None, :]]
    return band
