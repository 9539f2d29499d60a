"""What a slide's viewer shows, read from a scoring output: overlay, top tiles, tissue outline.

- The **overlay** is the attention grid (``heatmaps/<id>.npy`` placed by its sidecar) upsampled
  bilinearly between tile centres (NaN cells left out of the interpolation), coloured with the
  heatmap PNG's colour map and range, opaque on tissue tiles and transparent elsewhere; the image
  is placed in level-0 pixels (``Overlay.x, y, width, height``).
- **Top tiles** come from ``topk/<id>/index.csv`` (rank, x, y, attention, file).
- The **tissue outline** comes from ``geojson/<id>.annotations.geojson`` (QuPath annotations, level-0
  pixels): the Polygon and MultiPolygon features classified ``Tissue``; the file may be absent.
- The **tissue raster** decides where the deep pyramid levels get tiles: scored tile footprints,
  the tissue annotations and the tissue detection of ``slidemil.slide.tissue`` on the overview
  image, widened by a margin.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from slidemil.errors import SlideReadError
from slidemil.slide.tissue import segment_tissue

log = logging.getLogger(__name__)

CMAP = "jet"  # the colour map of heatmaps/<id>.png
OVERLAY_MAX_PX = 1024  # the browser smooths it further when zoomed in
TISSUE_MARGIN_UM = 64.0
Ring = list[list[float]]


@dataclass(frozen=True)
class Overlay:
    """An RGBA attention image and where it lies in level-0 pixels."""

    rgba: np.ndarray
    x: float
    y: float
    width: float
    height: float
    vmin: float
    vmax: float


def read_grid(scores_dir: Path, slide_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``heatmaps/<id>.npy`` and its sidecar.

    Raises:
        SlideReadError: either file is missing or they disagree.
    """
    npy, side = scores_dir / "heatmaps" / f"{slide_id}.npy", scores_dir / "heatmaps" / f"{slide_id}.json"
    if not (npy.is_file() and side.is_file()):
        raise SlideReadError(f"{slide_id}: no heatmap grid ({npy.name} and {side.name}) in {npy.parent}")
    grid = np.load(npy).astype(np.float32)
    sidecar = json.loads(side.read_text())
    if list(grid.shape) != list(sidecar.get("shape", [])):
        raise SlideReadError(f"{npy}: shape {list(grid.shape)} is not the sidecar's {sidecar.get('shape')}")
    return grid, sidecar


def _cells_along(sidecar: dict[str, Any], axis: int, n: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid index along ``axis`` (0: x/cols, 1: y/rows) of level-0 ``positions``, and whether inside a tile."""
    origin, stride, size = float(sidecar["origin_level0"][axis]), float(sidecar["stride_level0"]), float(
        sidecar["patch_size_level0"])
    idx = np.clip(np.floor((positions - origin) / stride), 0, max(n - 1, 0)).astype(np.int64)
    inside = (positions >= origin) & (positions < origin + idx * stride + size)
    return idx, inside


def grid_footprint(grid: np.ndarray, sidecar: dict[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """bool (len(ys), len(xs)): whether each level-0 point lies in a scored tile."""
    rows, cols = grid.shape
    if rows == 0 or cols == 0:
        return np.zeros((len(ys), len(xs)), dtype=bool)
    ci, cin = _cells_along(sidecar, 0, cols, xs)
    ri, rin = _cells_along(sidecar, 1, rows, ys)
    return np.isfinite(grid)[ri[:, None], ci[None, :]] & rin[:, None] & cin[None, :]


def _lut() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorbar_stops(n: int = 11) -> list[str]:
    """CSS colours of the colour map at ``n`` even steps (for a linear-gradient)."""
    lut = _lut()
    return ["#" + "".join(f"{v:02x}" for v in lut[round(i * 255 / (n - 1))].tolist()) for i in range(n)]


def render_overlay(grid: np.ndarray, sidecar: dict[str, Any], max_px: int = OVERLAY_MAX_PX) -> Overlay | None:
    """The smooth overlay of an attention grid (module docstring); None when the grid holds no tile."""
    rows, cols = grid.shape
    valid = np.isfinite(grid)
    if not valid.any():
        return None
    k = int(np.clip(max_px // max(rows, cols), 1, 16))
    stride, size = float(sidecar["stride_level0"]), float(sidecar["patch_size_level0"])
    ox, oy = (float(v) for v in sidecar["origin_level0"])
    x0, y0 = ox + (size - stride) / 2, oy + (size - stride) / 2  # pixel centres between tile centres
    out_w, out_h = cols * k, rows * k
    num = cv2.resize(np.where(valid, grid, 0).astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    den = cv2.resize(valid.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    values = num / np.maximum(den, 1e-6)
    xs = x0 + (np.arange(out_w) + 0.5) * stride / k
    ys = y0 + (np.arange(out_h) + 0.5) * stride / k
    on = grid_footprint(grid, sidecar, xs, ys)
    finite = grid[valid]
    lo, hi = float(finite.min()), float(finite.max())
    hi = hi if hi > lo else lo + 1.0
    idx = np.clip((values - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba = np.zeros((out_h, out_w, 4), dtype=np.uint8)
    rgba[..., :3] = _lut()[idx]
    rgba[..., 3] = np.where(on, 255, 0)
    return Overlay(rgba, x0, y0, cols * stride, rows * stride, lo, hi)


def png_bytes(rgba: np.ndarray) -> bytes:
    """RGBA uint8 as PNG bytes."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise OSError("PNG encoding failed")
    return data.tobytes()


def read_topk(scores_dir: Path, slide_id: str, tile_px: float) -> list[dict[str, Any]]:
    """Top tiles of ``topk/<id>/index.csv``: rank, x, y, size (level-0 px), attention, file (path); [] if none."""
    index = scores_dir / "topk" / slide_id / "index.csv"
    if not index.is_file():
        return []
    out = []
    with open(index, newline="") as f:
        for r in csv.DictReader(f):
            try:
                out.append({"rank": int(r["rank"]), "x": float(r["x"]), "y": float(r["y"]), "size": float(tile_px),
                            "attention": float(r.get("attention") or "nan"),
                            "file": index.parent / r["file"] if r.get("file") else None})
            except (KeyError, ValueError) as exc:
                log.warning("%s: skipping a row of index.csv: %s", slide_id, exc)
    return sorted(out, key=lambda t: t["rank"])


def annotations_path(scores_dir: Path, slide_id: str) -> Path:
    """``geojson/<id>.annotations.geojson``."""
    return scores_dir / "geojson" / f"{slide_id}.annotations.geojson"


def _class_name(props: dict[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        return str(cls.get("name")) if cls.get("name") is not None else None
    return str(cls) if cls is not None else None


def read_tissue_polygons(path: Path) -> list[list[Ring]]:
    """Polygons (each a list of rings: exterior, then holes) classified ``Tissue``; [] if none or unreadable."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: not readable GeoJSON, no tissue outline: %s", path, exc)
        return []
    features = data.get("features", []) if isinstance(data, dict) else data
    polygons: list[list[Ring]] = []
    for feat in features if isinstance(features, list) else []:
        if not isinstance(feat, dict) or _class_name(feat.get("properties") or {}) != "Tissue":
            continue
        geom = feat.get("geometry") or {}
        coords = geom.get("coordinates") or []
        parts = [coords] if geom.get("type") == "Polygon" else coords if geom.get("type") == "MultiPolygon" else []
        for poly in parts:
            rings = [[[float(p[0]), float(p[1])] for p in ring] for ring in poly if len(ring) >= 3]
            if rings:
                polygons.append(rings)
    return polygons


def tissue_raster(shape: tuple[int, int], level0_size: tuple[int, int], grid: np.ndarray, sidecar: dict[str, Any],
                  polygons: list[list[Ring]], overview_rgb: np.ndarray | None, slide_mpp: float) -> np.ndarray:
    """bool (h, w) over the whole slide at ``shape``: where the viewer needs full-resolution tiles."""
    h, w = shape
    sx, sy = w / level0_size[0], h / level0_size[1]
    xs, ys = (np.arange(w) + 0.5) / sx, (np.arange(h) + 0.5) / sy
    mask = grid_footprint(grid, sidecar, xs, ys).astype(np.uint8)
    for poly in polygons:
        pts = [np.round(np.asarray(ring) * [sx, sy]).astype(np.int32) for ring in poly]
        cv2.fillPoly(mask, pts, 1)
    mpp = slide_mpp / sx
    if overview_rgb is not None and overview_rgb.shape[:2] == (h, w):
        try:
            mask |= segment_tissue(overview_rgb, mpp).astype(np.uint8)
        except (cv2.error, ValueError) as exc:
            log.warning("tissue detection on the overview failed, using the scored tiles only: %s", exc)
    k = 2 * int(np.ceil(TISSUE_MARGIN_UM / mpp)) + 1
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0


def raster_to_cells(raster: np.ndarray, level0_size: tuple[int, int], cells_shape: tuple[int, int],
                    cell_px: int) -> np.ndarray:
    """bool (rows, cols): cells of ``cell_px`` level-0 px that hold a true pixel of the raster."""
    h, w = raster.shape
    rows, cols = cells_shape
    ri = np.minimum(((np.arange(h) + 0.5) * level0_size[1] / h // cell_px).astype(np.int64), rows - 1)
    ci = np.minimum(((np.arange(w) + 0.5) * level0_size[0] / w // cell_px).astype(np.int64), cols - 1)
    counts = np.zeros(cells_shape, dtype=np.int64)
    yy, xx = np.nonzero(raster)
    np.add.at(counts, (ri[yy], ci[xx]), 1)
    return counts > 0
