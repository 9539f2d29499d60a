"""Writing one scored slide's outputs (run by the engine's writer thread).

Heatmap grid (.npy + sidecar .json), overlay PNG (and one of each per class for heads with one attention
map per class), GeoJSON tiles for QuPath, the top-k most
attended tiles, then the slide's row in predictions.csv, last, so that a row with status ``ok``
always means its files are complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.engine.heatmap import overlap_heatmap
from slidemil.engine.outputs import (
    PredictionsTable,
    geojson_tiles,
    slide_paths,
    topk_indices,
    write_class_heatmaps,
    write_geojson,
    write_heatmap,
    write_topk,
)
from slidemil.engine.viewer_files import write_viewer_files
from slidemil.errors import SlidemilError
from slidemil.runtime.pipeline import SlideStream
from slidemil.slide.readers import open_slide
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)


@dataclass
class SlideResult:
    """What scoring one slide produced (arrays are None for a failed slide)."""

    stream: SlideStream
    row: dict[str, Any]
    probabilities: np.ndarray | None = None  # (C,)
    attention: np.ndarray | None = None  # (N,) normalised
    attention_raw: np.ndarray | None = None  # (N,)
    attention_per_class: np.ndarray | None = None  # (C, N) normalised, for heads with one map per class
    overlap_attention: tuple[np.ndarray, np.ndarray, int] | None = field(default=None)  # coords, values, size


def write_slide_outputs(result: SlideResult, out: Path, cfg: Any, table: PredictionsTable, class_names: list[str],
                        tiling: TilingConfig) -> None:
    """Write the files of a scored slide, then its predictions row (an error row if writing fails)."""
    row = dict(result.row)
    if row["status"] == "ok":
        try:
            _write_files(result, out, cfg, class_names, tiling)
        except (SlidemilError, OSError, ValueError) as exc:
            log.warning("%s: writing outputs failed: %s", row["slide_id"], exc)
            row.update(status="error", error=f"writing outputs failed: {exc}")
    table.append(row)


def _write_files(result: SlideResult, out: Path, cfg: Any, class_names: list[str], tiling: TilingConfig) -> None:
    stream, row = result.stream, result.row
    plan = stream.plan
    assert plan is not None and result.attention is not None and result.probabilities is not None
    grid = plan.grid
    slide_id = row["slide_id"]
    predicted = row["pred_class"]
    title = f"{slide_id}: {predicted} (p = {row['prob_' + predicted]:.3f})"
    overlap_map = None
    if result.overlap_attention is not None:
        coords, values, size0 = result.overlap_attention
        overlap_map = overlap_heatmap(grid.level0_size, coords, size0, values, plan.thumbnail.shape[:2])
    write_heatmap(out, slide_id, grid, result.attention, cfg.attention_norm, plan.thumbnail, title, overlap_map)
    if result.attention_per_class is not None:
        write_class_heatmaps(out, slide_id, grid, result.attention_per_class, cfg.attention_norm, plan.thumbnail,
                             class_names, result.probabilities)
    if cfg.geojson:
        fc = geojson_tiles(grid, result.attention, cfg.attention_norm, class_names, result.probabilities,
                           extra={"attention_raw": result.attention_raw} if result.attention_raw is not None else None)
        write_geojson(slide_paths(out, slide_id)["geojson"], fc)
    if cfg.top_k > 0:
        top = topk_indices(result.attention, cfg.top_k)
        with open_slide(stream.entry.path, mpp=stream.entry.mpp, slide_id=stream.entry.slide_id) as reader:
            tiles = reader.read_tiles(grid.coords[top], grid.patch_size_level0, tiling.tile.patch_size)
        write_topk(out, slide_id, tiles, grid.coords[top], result.attention[top])
    if cfg.viewer_files:  # the attention as an OME-TIFF overlay and QuPath annotations (tissue, top tiles)
        top = topk_indices(result.attention, cfg.top_k) if cfg.top_k > 0 else np.zeros(0, np.int64)
        write_viewer_files(out, slide_id, grid, result.attention, plan.tissue, top, cfg.attention_norm)
