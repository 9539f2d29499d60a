"""The attention map as a small pyramidal OME-TIFF that overlays the slide in viewers (QuPath, OpenSlide, napari).

Why colour-mapped uint8 RGB rather than float32: QuPath treats a 3-sample uint8 image as RGB and
draws it as it is, which is what an overlay needs (a script can stretch it over the slide with
QuPath's ``BufferedImageOverlay``); a float32 channel would first need a display range and a lookup
table set by hand, and OpenSlide refuses to read it ("can not handle images with 32-bit samples",
OpenSlide 4.0.1). The exact values stay in ``heatmaps/<id>.npy``; the colour map and its value range
are recorded in the OME ``Description``.

Layout of ``heatmaps/<id>.ome.tif``:

- level 0: ``pixels_per_tile`` pixels per tile step, sized so that it spans exactly the slide's
  level-0 extent (pixel (i, j) covers level-0 ``[j * W / w, (j + 1) * W / w)`` by
  ``[i * H / h, (i + 1) * H / h)``); ``PhysicalSizeX/Y`` = the slide's mpp times those factors, so
  the map and the slide have the same physical size; TIFF ``XResolution``/``YResolution`` carry the
  same pixel size for readers that ignore OME-XML;
- pyramid: each further level halves the previous (area interpolation) until it fits one tile,
  stored as SubIFDs of level 0 (``NewSubfileType`` 1), as the OME-TIFF pyramid specification asks;
- 256 x 256 tiles, deflate, white where no tile lies (the colour of slide background).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from slidemil import __version__
from slidemil.atomic import atomic_path
from slidemil.engine.heatmap import attention_grid, grid_to_pixels
from slidemil.slide.grid import TileGrid

TIFF_TILE = 256
DEFAULT_PIXELS_PER_TILE = 4
MAX_SIDE = 16384  # a map never gets larger than this on a side, whatever the slide
BACKGROUND = (255, 255, 255)


def overlay_shape(grid: TileGrid, pixels_per_tile: int = DEFAULT_PIXELS_PER_TILE) -> tuple[int, int]:
    """(h, w) of level 0: about ``pixels_per_tile`` pixels per grid step, spanning the whole slide."""
    width0, height0 = grid.level0_size
    scale = max(1, pixels_per_tile) / grid.stride_level0
    scale = min(scale, MAX_SIDE / max(width0, height0))
    return max(1, round(height0 * scale)), max(1, round(width0 * scale))


def colour_lut(cmap: str = "jet") -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colour map (the overlay PNG's colours)."""
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def value_range(values: np.ndarray) -> tuple[float, float]:
    """The finite range of ``values`` (0-1 when there is none; widened by 1 when flat), as the PNG's colour bar."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return lo, hi if hi > lo else lo + 1.0


def colour_map(values: np.ndarray, lo: float, hi: float, cmap: str = "jet") -> np.ndarray:
    """(h, w) float map -> (h, w, 3) uint8 RGB; NaN -> BACKGROUND."""
    finite = np.isfinite(values)
    idx = np.clip((np.where(finite, values, lo) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = colour_lut(cmap)[idx]
    rgb[~finite] = BACKGROUND
    return rgb


def pyramid(level0: np.ndarray, tile: int = TIFF_TILE) -> list[np.ndarray]:
    """``level0`` and its halvings (area interpolation) down to the first that fits in one tile."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > tile:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA))
    return levels


def write_ome_overlay(path: str | Path, grid: TileGrid, attention: np.ndarray, slide_id: str, norm: str,
                      pixels_per_tile: int = DEFAULT_PIXELS_PER_TILE, cmap: str = "jet") -> dict[str, Any]:
    """Write the colour-mapped attention of ``grid``'s tiles as a pyramidal, tiled OME-TIFF, atomically.

    Args:
        path: the file (``heatmaps/<id>.ome.tif``).
        grid: the slide's tile grid (level-0 geometry and mpp).
        attention: (N,) normalised attention of the grid's tiles.
        slide_id: recorded in the OME ``Name``.
        norm: the normalisation, recorded in the ``Description``.
        pixels_per_tile: level-0 pixels of the map per tile step.
        cmap: matplotlib colour map (the PNG overlay's, ``jet``).

    Returns:
        What was written: ``levels`` ((h, w) each), ``physical_size_um`` (x, y) of level 0, ``range``.
    """
    import tifffile

    h, w = overlay_shape(grid, pixels_per_tile)
    values = grid_to_pixels(grid, attention_grid(grid, attention), (h, w))
    lo, hi = value_range(np.asarray(attention, dtype=np.float64))
    levels = pyramid(colour_map(values, lo, hi, cmap))
    width0, height0 = grid.level0_size
    size_um = (grid.slide_mpp * width0 / w, grid.slide_mpp * height0 / h)
    description = {"slidemil": __version__, "slide_id": slide_id, "content": "attention", "attention_norm": norm,
                   "colormap": cmap, "range": [lo, hi], "background": "white: no tile",
                   "level0_size": [int(width0), int(height0)], "slide_mpp": float(grid.slide_mpp),
                   "map_pixel_level0": [width0 / w, height0 / h]}
    options: dict[str, Any] = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb", "compression": "zlib",
                               "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, ome=True, bigtiff=h * w * 3 > 2**31) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, resolution=(1e4 / size_um[0], 1e4 / size_um[1]),
                  metadata={"axes": "YXS", "Name": f"{slide_id} attention", "Description": json.dumps(description),
                            "PhysicalSizeX": size_um[0], "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": size_um[1], "PhysicalSizeYUnit": "µm"}, **options)
        for level in levels[1:]:
            fx, fy = w / level.shape[1], h / level.shape[0]
            tif.write(level, subfiletype=1, resolution=(1e4 / (size_um[0] * fx), 1e4 / (size_um[1] * fy)), **options)
    return {"levels": [tuple(lv.shape[:2]) for lv in levels], "physical_size_um": size_um, "range": (lo, hi)}


def overlay_pixel(grid: TileGrid, shape: tuple[int, int], x0: float, y0: float) -> tuple[int, int]:
    """(row, col) of level 0 of the map that holds level-0 point (x0, y0)."""
    h, w = shape
    width0, height0 = grid.level0_size
    return min(h - 1, int(math.floor(y0 * h / height0))), min(w - 1, int(math.floor(x0 * w / width0)))
