"""Viewer-ready files of a scored slide: an OME-TIFF overlay and QuPath annotations.

::

    heatmaps/<id>.ome.tif                  attention as a pyramidal, tiled RGB OME-TIFF spanning the slide
                                           (slidemil.engine.ome_overlay)
    geojson/<id>.annotations.geojson       QuPath annotations: tissue contours and the top-k tiles

The annotations file is a GeoJSON FeatureCollection in level-0 pixels that QuPath imports with
File > Import objects. Each Feature has ``properties.objectType == "annotation"``, a ``name``, a
``classification`` ``{"name": ..., "color": [r, g, b]}`` and ``measurements``:

- ``Tissue`` (``TISSUE_CLASS``): one Polygon per tissue region of the tissue mask, outer ring then
  its holes (outer rings counter-clockwise with y up, holes clockwise); ``measurements.area_um2``.
  Other tools (the HTML viewer) read the tissue contour from these features.
- ``Top attention`` (``TOP_CLASS``): the square of each of the top-k tiles, ``name`` ``Top attention
  #<rank>``, ``measurements`` ``rank`` and ``attention``.

The collection carries a ``slidemil`` member: slide id, coordinates, the classifications, the mask's
source and resolution, and the attention normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from slidemil.engine.ome_overlay import DEFAULT_PIXELS_PER_TILE, write_ome_overlay
from slidemil.engine.outputs import write_geojson
from slidemil.slide.grid import TileGrid, covered_by_tiles
from slidemil.slide.tissue import TissueMask

log = logging.getLogger(__name__)

TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (0, 170, 0)  # the green of the tiling previews' tissue contour
TOP_CLASS = "Top attention"
TOP_COLOR = (230, 20, 20)
TILES_MASK_PX = 4  # mask pixels per tile step when the tissue mask is made from the tiles


def viewer_paths(out_dir: str | Path, slide_id: str) -> dict[str, Path]:
    """Where the viewer files of ``slide_id`` live."""
    out = Path(out_dir)
    return {"ome_tiff": out / "heatmaps" / f"{slide_id}.ome.tif",
            "annotations": out / "geojson" / f"{slide_id}.annotations.geojson"}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring(points: np.ndarray, scale: float, outer: bool) -> list[list[float]] | None:
    """A closed GeoJSON ring in level-0 pixels from contour points at mask resolution; None if degenerate."""
    pts = points.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return None
    xy = (pts + 0.5) * scale  # mask pixel centres
    area = _signed_area(xy)
    if area == 0:
        return None
    if (area > 0) != outer:  # outer: positive shoelace (counter-clockwise with y up); holes: negative
        xy = xy[::-1]
    xy = np.round(xy, 1)
    return [[float(x), float(y)] for x, y in xy] + [[float(xy[0, 0]), float(xy[0, 1])]]


def tissue_polygons(mask: np.ndarray, scale: float, simplify_px: float = 0.75) -> list[list[list[list[float]]]]:
    """Polygons (outer ring, then holes) of a bool mask, in level-0 pixels.

    Args:
        mask: bool (h, w) tissue mask.
        scale: level-0 pixels per mask pixel.
        simplify_px: Douglas-Peucker tolerance in mask pixels (0: keep every contour point).
    """
    m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8))
    if not m.any():
        return []
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    polygons = []
    for i, contour in enumerate(contours):
        if links[i][3] != -1:
            continue  # a hole: added with its outer ring
        simplified = cv2.approxPolyDP(contour, simplify_px, True) if simplify_px > 0 else contour
        outer = _ring(simplified, scale, outer=True)
        if outer is None:
            continue
        rings = [outer]
        child = links[i][2]
        while child != -1:
            hole_pts = cv2.approxPolyDP(contours[child], simplify_px, True) if simplify_px > 0 else contours[child]
            hole = _ring(hole_pts, scale, outer=False)
            if hole is not None:
                rings.append(hole)
            child = links[child][0]
        polygons.append(rings)
    return polygons


def _polygon_area(rings: list[list[list[float]]]) -> float:
    return abs(_signed_area(np.asarray(rings[0]))) - sum(abs(_signed_area(np.asarray(r))) for r in rings[1:])


def _annotation(rings: list[list[list[float]]], name: str, cls: str, color: tuple[int, int, int],
                measurements: dict[str, float]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "name": name, "isLocked": True,
                           "classification": {"name": cls, "color": list(color)}, "measurements": measurements}}


def annotations_collection(slide_id: str, grid: TileGrid, attention: np.ndarray, tissue: TissueMask,
                           top_k_indices: np.ndarray, norm: str) -> dict[str, Any]:
    """The QuPath annotations of a slide: tissue regions (with holes), then the top-k tiles by rank."""
    scale = tissue.mpp / grid.slide_mpp  # level-0 pixels per mask pixel
    um2 = grid.slide_mpp ** 2
    features = [_annotation(rings, f"{TISSUE_CLASS} {i}", TISSUE_CLASS, TISSUE_COLOR,
                            {"area_um2": round(_polygon_area(rings) * um2, 1)})
                for i, rings in enumerate(tissue_polygons(tissue.mask, scale), start=1)]
    s = int(grid.patch_size_level0)
    attention = np.asarray(attention, dtype=np.float64)
    for rank, i in enumerate(np.asarray(top_k_indices, dtype=np.int64).tolist(), start=1):
        x, y = (float(v) for v in grid.coords[i])
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append(_annotation([ring], f"{TOP_CLASS} #{rank}", TOP_CLASS, TOP_COLOR,
                                    {"rank": rank, "attention": float(attention[i])}))
    meta = {"slide_id": slide_id, "coordinates": "level-0 pixels", "slide_mpp": float(grid.slide_mpp),
            "classifications": {TISSUE_CLASS: list(TISSUE_COLOR), TOP_CLASS: list(TOP_COLOR)},
            "tissue_source": tissue.source, "tissue_mask_mpp": float(tissue.mpp), "attention_norm": norm}
    return {"type": "FeatureCollection", "slidemil": meta, "features": features}


def tissue_from_tiles(grid: TileGrid) -> TissueMask:
    """A tissue mask made of the tiles themselves (when no tissue mask is at hand): TILES_MASK_PX px per tile step."""
    mpp = grid.slide_mpp * grid.stride_level0 / TILES_MASK_PX
    width0, height0 = grid.level0_size
    shape = (max(1, round(height0 * grid.slide_mpp / mpp)), max(1, round(width0 * grid.slide_mpp / mpp)))
    mask = covered_by_tiles(shape, mpp, grid.slide_mpp, grid.coords, grid.patch_size_level0)
    return TissueMask(mask=mask, mpp=mpp, source="tiles")


def write_viewer_files(out_dir: str | Path, slide_id: str, grid: TileGrid, attention: np.ndarray,
                       tissue_mask: TissueMask | None, top_k_indices: np.ndarray, norm: str = "percentile",
                       pixels_per_tile: int = DEFAULT_PIXELS_PER_TILE, cmap: str = "jet") -> dict[str, Path]:
    """Write ``heatmaps/<id>.ome.tif`` and ``geojson/<id>.annotations.geojson``, each atomically.

    Args:
        out_dir: the run's output folder.
        slide_id: the slide's id.
        grid: its tile grid.
        attention: (N,) normalised attention of the grid's tiles.
        tissue_mask: the tissue mask the grid was made from (``TilePlan.tissue``); None: the tiles' footprint.
        top_k_indices: indices of the top-k tiles, highest first (``topk_indices``).
        norm: the attention normalisation, recorded in both files.
        pixels_per_tile: OME-TIFF pixels per tile step.
        cmap: colour map of the OME-TIFF (that of the PNG overlay).

    Returns:
        The paths written (``ome_tiff``, ``annotations``).
    """
    paths = viewer_paths(out_dir, slide_id)
    attention = np.asarray(attention)
    assert attention.shape == (len(grid),), f"attention must be ({len(grid)},), got {attention.shape}"
    written = write_ome_overlay(paths["ome_tiff"], grid, attention, slide_id, norm, pixels_per_tile, cmap)
    log.debug("%s: OME-TIFF overlay %s", slide_id, written["levels"])
    tissue = tissue_mask if tissue_mask is not None and tissue_mask.mask.any() else tissue_from_tiles(grid)
    write_geojson(paths["annotations"], annotations_collection(slide_id, grid, attention, tissue, top_k_indices, norm))
    return paths
