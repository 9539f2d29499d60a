"""`slidemil heatmap`: scoring outputs from stored features, without reading a slide's tiles again.

For each features file (``slidemil extract``'s ``FEAT/features/<id>.h5``) the head alone runs on the
stored features (:mod:`slidemil.engine.head_only`: a package's ``head.onnx`` on ONNX Runtime on the
CPU, as ``score`` runs it), the tile grid is rebuilt from the stored coords, and the engine's own
writers write what ``score`` writes: ``heatmaps/<id>.npy`` + ``.json`` + ``.png``, GeoJSON tiles,
top-k tiles, the predictions row, plus the viewer files (OME-TIFF overlay, QuPath annotations).

The slide file is optional (``slides``): with it, the thumbnail and tissue mask come from the slide
exactly as ``score`` makes them (a low-resolution read) and the top-k tiles are cut from it; without
it the overlay is drawn on a blank canvas of the slide's size (said in the PNG title), the tissue is
the tiles' footprint and no top-k tiles are written. By default the PNG shows a smooth map
interpolated from the grid (:mod:`slidemil.engine.smooth_heatmap`), saved where ``--heatmap-overlap``
saves its map (``heatmaps/<id>.overlap.npy``, described in the sidecar).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.atomic import TMP_MARK, write_json
from slidemil.choices import AttentionNorm
from slidemil.config import save_config
from slidemil.engine.head_only import HeadModel, open_head
from slidemil.engine.heatmap import normalize_attention, prime_renderer
from slidemil.engine.ome_overlay import DEFAULT_PIXELS_PER_TILE
from slidemil.engine.outputs import (
    PredictionsTable,
    geojson_tiles,
    outputs_complete,
    slide_paths,
    topk_indices,
    write_class_heatmaps,
    write_geojson,
    write_heatmap,
    write_run_summary,
    write_topk,
)
from slidemil.engine.smooth_heatmap import DEFAULT_SIGMA, smooth_attention_map
from slidemil.engine.viewer_files import viewer_paths, write_viewer_files
from slidemil.errors import NoTissueError, SlideOpenError, StoreError
from slidemil.evaluation.operating_point import predict_index
from slidemil.jobs import FAILURES, error_text, pending
from slidemil.models.mil import PER_CLASS_OUTPUT
from slidemil.slide.grid import TileGrid, covered_by_tiles, grid_from_coords
from slidemil.slide.reader import SlideReader
from slidemil.slide.readers import open_slide
from slidemil.slide.store import FeatureBag, read_h5
from slidemil.slide.table import SlideEntry, load_slides
from slidemil.slide.tissue import TissueConfig, TissueMask, detect_tissue

log = logging.getLogger(__name__)

CANVAS_GREY = 240  # the blank canvas drawn when no slide file is given


@dataclass(frozen=True)
class HeatmapConfig:
    """Settings of ``slidemil heatmap``."""

    attention_norm: AttentionNorm = "percentile"
    top_k: int = 8
    geojson: bool = True
    smooth: bool = True
    smooth_sigma: float = DEFAULT_SIGMA
    viewer_files: bool = True
    overlay_pixels_per_tile: int = DEFAULT_PIXELS_PER_TILE
    threads: int | None = None


@dataclass
class Canvas:
    """What the overlay is drawn on: a thumbnail of the slide (or a blank one), its tissue, and a note."""

    thumbnail: np.ndarray  # uint8 (h, w, 3)
    tissue: TissueMask
    note: str = ""


def feature_files(features: str | Path) -> list[Path]:
    """The h5 files of ``features``: one file, a folder of them, or ``slidemil extract``'s folder (``FEAT/features``).

    Raises:
        StoreError: nothing to read there.
    """
    path = Path(features)
    if path.is_file():
        return [path]
    folder = path / "features" if (path / "features").is_dir() else path
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith(TMP_MARK))
    if not files:
        raise StoreError(f"{path}: no features (.h5) files; give `slidemil extract`'s folder, its features/ "
                         "folder or one h5 file")
    return files


def heatmaps_from_features(features: str | Path, model: str | Path, out_dir: str | Path,
                           cfg: HeatmapConfig = HeatmapConfig(), slides: str | Path | None = None,
                           slide_mpp: float | None = None) -> dict[str, Any]:
    """Write ``score``'s per-slide outputs for every features file, running the head only; returns the run summary.

    Args:
        features: an h5 file, a folder of them, or ``slidemil extract``'s output folder.
        model: a model package, or a checkpoint (``run/checkpoint_best``) whose head is used.
        out_dir: output folder (same layout as ``score``'s).
        cfg: settings.
        slides: optional folder, glob or CSV of the slide files (matched by slide id) for the
            thumbnails, tissue masks and top-k tiles.
        slide_mpp: level-0 mpp for every slide file (as ``score --slide-mpp``).
    """
    out = Path(out_dir)
    files = feature_files(features)
    entries = {e.slide_id: e for e in load_slides(slides, slide_mpp)} if slides is not None else {}
    start = time.perf_counter()
    with open_head(model, cfg.threads) as head:
        prime_renderer()
        load_seconds = time.perf_counter() - start
        save_config(cfg, out / "heatmap_config.json", model=str(model), features=str(features),
                    slides=str(slides) if slides is not None else None, head=head.describe())
        bags = [SlideEntry(f.stem, f) for f in files]  # the work items: one features file per slide
        with PredictionsTable(out, head.class_names) as table:
            todo = pending(bags, table, lambda b: _complete(out, b.slide_id, cfg, b.slide_id in entries),
                           lambda b: [*slide_paths(out, b.slide_id).values(), *viewer_paths(out, b.slide_id).values()])
            log.info("%d slides to draw (%d already done)", len(todo), len(files) - len(todo))
            n_tiles = 0
            for bag in todo:
                if slides is not None and bag.slide_id not in entries:
                    log.warning("%s is not among the slides of %s: drawn on a blank canvas, no top-k tiles",
                                bag.slide_id, slides)
                row = heatmap_slide(bag.path, head, out, cfg, entries.get(bag.slide_id))
                n_tiles += int(row.get("n_tiles") or 0)
                table.record(row)
    wall = time.perf_counter() - start
    failed = [r["slide_id"] for r in table.rows.values() if r.get("status") != "ok"]
    summary = {"slides": len(table), "scored_this_run": len(todo), "failures": len(failed), "failed_slides": failed,
               "total_tiles": n_tiles, "wall_seconds": round(wall, 3), "model_load_seconds": round(load_seconds, 3),
               "seconds_per_slide": round((wall - load_seconds) / len(todo), 4) if todo else None,
               "backend": [head.describe()], "device": "cpu", "source": "features",
               "attention_norm": cfg.attention_norm}
    write_run_summary(out / "run_summary.json", **summary)
    return summary


def _complete(out: Path, slide_id: str, cfg: HeatmapConfig, has_slide: bool) -> bool:
    complete = outputs_complete(out, slide_id, want_geojson=cfg.geojson, want_topk=cfg.top_k if has_slide else 0,
                                want_overlap=cfg.smooth)
    return complete and (not cfg.viewer_files or all(p.is_file() for p in viewer_paths(out, slide_id).values()))


def heatmap_slide(path: Path, head: HeadModel, out: Path, cfg: HeatmapConfig, entry: SlideEntry | None) -> dict[str, Any]:
    """One features file -> its outputs; returns its predictions row (status ``error`` with the message if it fails)."""
    start = time.perf_counter()
    row: dict[str, Any] = {"slide_id": path.stem, "status": "ok", "error": ""}
    try:
        bag = read_bag(path, head)
        a = bag.attrs
        grid = grid_from_coords(bag.coords, a.patch_size_level0, a.stride_level0, (a.level0_width, a.level0_height),
                                a.slide_mpp)
        assert bag.features is not None
        outputs = head.runner.infer({"features": bag.features})
        probs = np.asarray(outputs["probabilities"], dtype=np.float64).reshape(-1)
        raw = np.asarray(outputs["attention_raw"], dtype=np.float32).reshape(-1)
        attention = normalize_attention(raw, cfg.attention_norm)
        per_class = outputs.get(PER_CLASS_OUTPUT)
        if per_class is not None:
            per_class = np.stack([normalize_attention(a, cfg.attention_norm) for a in per_class])
        index = int(predict_index(probs, head.operating_point))
        row.update(pred_class=head.class_names[index], pred_index=index, n_tiles=len(grid),
                   attention_norm=cfg.attention_norm,
                   **{f"prob_{c}": float(p) for c, p in zip(head.class_names, probs)})
        write_outputs(out, grid, bag, attention, raw, probs, row, head, cfg, entry, per_class)
    except FAILURES as exc:
        log.warning("%s: %s", path.stem, exc)
        row.update(status="error", error=error_text(exc))
    seconds = time.perf_counter() - start
    row["seconds"] = round(seconds, 4)
    if row["status"] == "ok":
        row["tiles_per_s"] = round(row["n_tiles"] / seconds, 2) if seconds > 0 else None
    return row


def read_bag(path: Path, head: HeadModel) -> FeatureBag:
    """The features file, checked against what the head was trained on.

    Raises:
        StoreError: no features in the file. ConfigError: features of another backbone or tiling.
        NoTissueError: a slide without tiles.
    """
    bag = read_h5(path)
    if bag.features is None:
        raise StoreError(f"{path}: coords only, no features; extract them with `slidemil extract`")
    head.check_features(bag.features.shape[1], bag.feature_attrs, bag.attrs.patch_size, bag.attrs.mpp, str(path))
    if len(bag.coords) == 0:
        raise NoTissueError(f"{path.stem}: no tissue tiles to score")
    precision = bag.feature_attrs.get("precision")
    if precision not in (None, "fp32"):
        log.info("%s: features were extracted at %s; score at fp32 would give slightly different numbers", path.stem,
                 precision)
    return bag


def write_outputs(out: Path, grid: TileGrid, bag: FeatureBag, attention: np.ndarray, raw: np.ndarray,
                  probs: np.ndarray, row: dict[str, Any], head: HeadModel, cfg: HeatmapConfig,
                  entry: SlideEntry | None, per_class: np.ndarray | None = None) -> None:
    """The engine's writers, in ``score``'s order (``per_class``: (C, N) normalised maps of heads that
    have one per class); the predictions row is appended by the caller, last."""
    slide_id, predicted = row["slide_id"], row["pred_class"]
    top = topk_indices(attention, cfg.top_k)
    with _open(entry) as reader:
        canvas = slide_canvas(reader, grid, head.tissue, entry)
        if reader is not None and len(top):
            tiles = reader.read_tiles(grid.coords[top], grid.patch_size_level0, bag.attrs.patch_size)
        else:
            tiles = None
    title = f"{slide_id}: {predicted} (p = {row['prob_' + predicted]:.3f}){canvas.note}"
    smooth = None
    if cfg.smooth:
        smooth = smooth_attention_map(grid, attention, canvas.thumbnail.shape[:2], canvas.tissue.mask, cfg.smooth_sigma)
    write_heatmap(out, slide_id, grid, attention, cfg.attention_norm, canvas.thumbnail, title, smooth)
    if smooth is not None:
        describe_smooth_map(slide_paths(out, slide_id)["sidecar"], cfg.smooth_sigma)
    if per_class is not None:
        write_class_heatmaps(out, slide_id, grid, per_class, cfg.attention_norm, canvas.thumbnail, head.class_names,
                             probs)
    if cfg.geojson:
        fc = geojson_tiles(grid, attention, cfg.attention_norm, head.class_names, probs, extra={"attention_raw": raw})
        write_geojson(slide_paths(out, slide_id)["geojson"], fc)
    if tiles is not None:
        write_topk(out, slide_id, tiles, grid.coords[top], attention[top])
    if cfg.viewer_files:
        write_viewer_files(out, slide_id, grid, attention, canvas.tissue, top, cfg.attention_norm,
                           cfg.overlay_pixels_per_tile)


@contextlib.contextmanager
def _open(entry: SlideEntry | None) -> Any:
    if entry is None:
        yield None
        return
    with open_slide(entry.path, mpp=entry.mpp, slide_id=entry.slide_id) as reader:
        yield reader


def slide_canvas(reader: SlideReader | None, grid: TileGrid, tissue_cfg: TissueConfig,
                 entry: SlideEntry | None) -> Canvas:
    """Thumbnail and tissue mask as ``score`` makes them (from the slide), or a blank canvas and the tiles' footprint.

    Raises:
        SlideOpenError: the slide file is not the one the features were cut from (another size).
    """
    if reader is not None:
        if tuple(reader.dimensions) != tuple(grid.level0_size):
            raise SlideOpenError(f"{entry.path if entry else reader.path} is {reader.dimensions[0]} x "
                                 f"{reader.dimensions[1]} px but the features were cut from a {grid.level0_size[0]} x "
                                 f"{grid.level0_size[1]} px slide; give the slide these features came from")
        try:
            tissue, thumbnail = detect_tissue(reader, tissue_cfg)
        except NoTissueError:
            thumbnail, mpp = reader.thumbnail(mpp=tissue_cfg.thumb_mpp)
            tissue = TissueMask(mask=np.zeros(thumbnail.shape[:2], bool), mpp=mpp, source="none")
        return Canvas(thumbnail, tissue)
    width0, height0 = grid.level0_size
    scale = grid.slide_mpp / tissue_cfg.thumb_mpp
    w, h = max(1, round(width0 * scale)), max(1, round(height0 * scale))
    mpp = grid.slide_mpp * width0 / w
    mask = covered_by_tiles((h, w), mpp, grid.slide_mpp, grid.coords, grid.patch_size_level0)
    return Canvas(np.full((h, w, 3), CANVAS_GREY, np.uint8), TissueMask(mask=mask, mpp=mpp, source="tiles"),
                  note=f" - no slide: blank {width0}x{height0} canvas")


def describe_smooth_map(sidecar: Path, sigma: float) -> None:
    """Say in the heatmap sidecar how ``<id>.overlap.npy`` was made (here: from the grid, not an overlapping grid)."""
    data = json.loads(sidecar.read_text())
    data.setdefault("overlap_map", {})["method"] = (
        f"smoothed from the tile grid: Gaussian of {sigma:g} tiles over the scored tiles (normalised convolution), "
        "bilinear between tile centres, NaN off tissue (slidemil heatmap); not an overlapping grid")
    write_json(sidecar, data)
