"""Deep-zoom viewer pages of scored slides: ``build_viewers``, called by ``slidemil report``.

For each chosen slide of a scoring output, under ``REPORT/viewer/``::

    <id>.html                       the page (``slidemil.report.viewer_page``), linked from the gallery
    tiles/<id>.dzi, <id>_files/     the sparse DZI pyramid (``slidemil.report.deepzoom``, ``pyramid``)
    tiles/<id>.json                 what the pyramid was built from; a rerun with the same inputs skips it
    overlay/<id>.png                the smooth attention overlay (``slidemil.report.viewer_data``)
    assets/                         OpenSeadragon (vendored, with its licence), the page's script and CSS

The slide files are found through the slides source the scoring run recorded (``score_config.json``,
``slides``), or ``slides`` given here.

Which pyramid tiles are written ("lazily, only the levels needed"): levels that fit in
``OVERVIEW_PX`` whole (glass included); deeper levels only where a tile meets tissue (scored tiles,
tissue annotations, tissue detection on the overview, plus a margin); nothing finer than
``max_mpp``. A pyramid is only (re)built when its slide, heatmap, annotations or settings changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from slidemil.atomic import write_bytes, write_json, write_text
from slidemil.errors import ConfigError, LabelTableError, SlidemilError, SlideOpenError
from slidemil.report import viewer_data as VD
from slidemil.report.deepzoom import DziGeometry, cap_level, cell_grid, dzi_json, overview_level, plan_pyramid
from slidemil.report.evaluate import read_predictions
from slidemil.report.html import href
from slidemil.report.pyramid import overview_image, tiles_dir, write_pyramid
from slidemil.report.viewer_page import PageLinks, copy_assets, render_viewer_page
from slidemil.slide.readers import open_slide
from slidemil.slide.table import SlideEntry, load_slides

log = logging.getLogger(__name__)

VIEWER_DIR = "viewer"
AUTO_MAX_SLIDES = 200
RECORD_SCHEMA = 1


@dataclass(frozen=True)
class ViewerSettings:
    """How pyramids are written (a change rebuilds them)."""

    max_mpp: float | None = None
    tile_size: int = 510
    overlap: int = 1
    quality: int = 80


@dataclass
class ViewerBuild:
    """What ``build_viewers`` did: pages (slide id -> path relative to the report), slides left out (id -> why)."""

    pages: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    built: int = 0
    reused: int = 0
    tiles: int = 0
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def choose_slides(which: str | Sequence[str], ok_ids: list[str]) -> tuple[list[str], str | None]:
    """The slides to build viewers for, and a note when some were left out on purpose.

    ``which``: ``auto`` (all when at most ``AUTO_MAX_SLIDES``, else none), ``all``, ``none``, ids
    separated by commas, ``@FILE`` (one id a line), or a list of ids.

    Raises:
        ConfigError: ids that were not scored.
    """
    if isinstance(which, str):
        text = which.strip()
        if text in ("all", "auto", "none", ""):
            if text == "none" or (text == "auto" and len(ok_ids) > AUTO_MAX_SLIDES):
                why = (f"{len(ok_ids)} slides, more than {AUTO_MAX_SLIDES}" if text == "auto" else "--viewer none")
                return [], f"No deep-zoom viewers ({why}): give --viewer all, or --viewer ID,ID... for some."
            return list(ok_ids), None
        ids = ([s.strip() for s in Path(text[1:]).read_text().splitlines()] if text.startswith("@")
               else [s.strip() for s in text.split(",")])
    else:
        ids = [str(s) for s in which]
    ids = [i for i in dict.fromkeys(ids) if i]
    unknown = [i for i in ids if i not in set(ok_ids)]
    if unknown:
        raise ConfigError(f"--viewer: {unknown[:5]} are not scored slides of this output (status ok, with a heatmap)")
    return ids, None


def _slide_entries(scores_dir: Path, slides: str | Path | None, slide_mpp: float | None) -> dict[str, SlideEntry]:
    """Slide id -> entry, from ``slides`` or the scoring run's recorded source.

    Raises:
        LabelTableError: no source is known or it lists no slide.
    """
    source: str | Path | None = slides
    if source is None:
        config = scores_dir / "score_config.json"
        recorded = json.loads(config.read_text()).get("slides") if config.is_file() else None
        if not recorded:
            raise LabelTableError(f"{config} records no slides source: give --slides")
        source = str(recorded)
        if not Path(source).is_absolute() and not Path(source).exists():
            for base in (scores_dir, scores_dir.parent):
                if (base / source).exists():
                    source = base / source
                    break
    return {e.slide_id: e for e in load_slides(source, slide_mpp)}


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _inputs(scores_dir: Path, sid: str, entry: SlideEntry, settings: ViewerSettings) -> dict[str, Any]:
    return {"schema": RECORD_SCHEMA, "slide": str(entry.path.resolve()), "slide_stat": _stat(entry.path),
            "heatmap_stat": _stat(scores_dir / "heatmaps" / f"{sid}.npy"),
            "annotations_stat": _stat(VD.annotations_path(scores_dir, sid)), "settings": asdict(settings)}


def _pyramid(scores_dir: Path, tiles: Path, sid: str, entry: SlideEntry, settings: ViewerSettings,
             grid: Any, sidecar: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The pyramid record of a slide, (re)building the pyramid when its inputs changed; (record, built)."""
    inputs = _inputs(scores_dir, sid, entry, settings)
    record_path = tiles / f"{sid}.json"
    if record_path.is_file() and (tiles / f"{sid}.dzi").is_file() and tiles_dir(tiles, sid).is_dir():
        old = json.loads(record_path.read_text())
        if old.get("inputs") == inputs:
            return old, False
    mpp = float(sidecar["slide_mpp"])
    with open_slide(entry.path, mpp=entry.mpp or mpp, slide_id=sid) as reader:
        size = (int(reader.dimensions[0]), int(reader.dimensions[1]))
        if list(size) != [int(v) for v in sidecar["level0_size"]]:
            raise SlideOpenError(f"{entry.path} is {size[0]} x {size[1]} px, the scored slide was "
                                f"{sidecar['level0_size']}: not the slide that was scored (give --slides)")
        geometry = DziGeometry(size[0], size[1], settings.tile_size, settings.overlap)
        cap = cap_level(geometry, mpp, settings.max_mpp)
        overview = overview_image(reader, geometry, min(overview_level(geometry), cap))
        raster = VD.tissue_raster(overview.shape[:2], size, grid, sidecar,
                                  VD.read_tissue_polygons(VD.annotations_path(scores_dir, sid)), overview, mpp)
        shape, cell_px = cell_grid(geometry, cap)
        plan = plan_pyramid(geometry, VD.raster_to_cells(raster, size, shape, cell_px), mpp, settings.max_mpp)
        stats = write_pyramid(reader, plan, tiles, sid, settings.quality, overview=overview)
    record = {"inputs": inputs, "dzi": dzi_json(plan, ""), "tiles": stats.tiles, "bytes": stats.bytes,
              "seconds": round(stats.seconds, 3), "per_level": {str(k): v for k, v in stats.per_level.items()},
              "levels": {"max": geometry.max_level, "overview": plan.overview_level, "cap": plan.cap_level,
                         "cap_mpp": geometry.mpp(plan.cap_level, mpp)}}
    write_json(record_path, record)
    return record, True


def _one(scores_dir: Path, out: Path, sid: str, entry: SlideEntry, settings: ViewerSettings) -> dict[str, Any]:
    """Build (or reuse) one slide's pyramid and overlay; returns the page's data and the record."""
    grid, sidecar = VD.read_grid(scores_dir, sid)
    record, built = _pyramid(scores_dir, out / "tiles", sid, entry, settings, grid, sidecar)
    overlay = VD.render_overlay(grid, sidecar)
    data: dict[str, Any] = {"slide_id": sid, "width": int(sidecar["level0_size"][0]),
                            "height": int(sidecar["level0_size"][1]), "mpp": float(sidecar["slide_mpp"]),
                            "levels": {**record["levels"], "tiles": record["tiles"]}}
    dzi = record["dzi"]
    dzi["Image"]["Url"] = href(f"tiles/{sid}_files/")
    data["dzi"] = dzi
    data["overlay"] = None
    if overlay is not None:
        write_bytes(out / "overlay" / f"{sid}.png", VD.png_bytes(overlay.rgba))
        data["overlay"] = {"href": href(f"overlay/{sid}.png"), "x": overlay.x, "y": overlay.y, "width": overlay.width,
                           "height": overlay.height, "min": overlay.vmin, "max": overlay.vmax,
                           "norm": str(sidecar.get("attention_norm", ""))}
    data["tissue"] = [ring for poly in VD.read_tissue_polygons(VD.annotations_path(scores_dir, sid)) for ring in poly]
    topk = VD.read_topk(scores_dir, sid, float(sidecar["patch_size_level0"]))
    data["topk"] = [{**{k: t[k] for k in ("rank", "x", "y", "size")},
                     "attention": t["attention"] if math.isfinite(t["attention"]) else None,
                     "img": os.path.relpath(t["file"], out) if t["file"] is not None else None} for t in topk]
    return {"data": data, "record": record, "built": built}


@dataclass(frozen=True)
class ViewerConfig:
    """Which deep-zoom viewers a report builds, and how (see :func:`build_viewers`)."""

    slides: str | None = None
    which: str = "auto"
    max_mpp: float | None = None
    slide_mpp: float | None = None
    quality: int = 80
    workers: int | None = None


def build_viewers(scores_dir: str | Path, report_dir: str | Path, slides: str | Path | None = None,
                  which: str | Sequence[str] = "auto", max_mpp: float | None = None, slide_mpp: float | None = None,
                  truth: Mapping[str, str] | None = None, quality: int = 80, workers: int | None = None,
                  ) -> ViewerBuild:
    """Write ``report_dir/viewer/<id>.html`` and its pyramid for the chosen scored slides.

    Args:
        scores_dir: output folder of ``slidemil score``.
        report_dir: the report folder; pages go to its ``viewer/``.
        slides: folder, glob or CSV of the slide files; default the scoring run's ``slides``.
        which: ``auto``, ``all``, ``none``, comma-separated ids, ``@FILE``, or a list of ids.
        max_mpp: finest resolution of the pyramids (um/px); None for the slides' full resolution.
        slide_mpp: microns per pixel of every slide, as given to ``slidemil score --slide-mpp``.
        truth: slide id -> true class, shown on the page when known.
        quality: JPEG quality of the tiles.
        workers: slides built at once (threads); default ``min(4, CPUs)``.

    Returns:
        What was built; slides that could not be shown are in ``skipped`` with the reason.

    Raises:
        ConfigError: ``which`` names slides that were not scored.
    """
    src, out = Path(scores_dir), Path(report_dir) / VIEWER_DIR
    start = time.perf_counter()
    result = ViewerBuild()
    preds, class_names = read_predictions(src / "predictions.csv")
    status = preds["status"].fillna("ok") if "status" in preds.columns else pd.Series("ok", index=preds.index)
    ok = preds[status == "ok"]
    ok_ids = [str(s) for s in ok["slide_id"] if (src / "heatmaps" / f"{s}.json").is_file()]
    chosen, note = choose_slides(which, ok_ids)
    if note:
        result.notes.append(note)
    if not chosen:
        return result
    try:
        entries = _slide_entries(src, slides, slide_mpp)
    except (LabelTableError, OSError) as exc:
        log.warning("no deep-zoom viewers: %s", exc)
        result.notes.append(f"No deep-zoom viewers: the slide files were not found ({exc}); give --slides.")
        result.skipped = {sid: str(exc) for sid in chosen}
        return result
    settings = ViewerSettings(max_mpp, quality=quality)
    try:
        copy_assets(out)
    except ConfigError as exc:
        log.warning("no deep-zoom viewers: %s", exc)
        result.notes.append(f"No deep-zoom viewers: {exc}")
        result.skipped = {sid: str(exc) for sid in chosen}
        return result
    todo = [sid for sid in chosen if sid in entries]
    result.skipped = {sid: "slide file not found in the slides source" for sid in chosen if sid not in entries}

    def run(sid: str) -> dict[str, Any] | str:
        try:
            return _one(src, out, sid, entries[sid], settings)
        except (SlidemilError, OSError, ValueError, KeyError) as exc:
            log.warning("%s: no viewer: %s", sid, exc)
            return f"{type(exc).__name__}: {exc}"

    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, n_workers), thread_name_prefix="viewer") as pool:
        done = dict(zip(todo, pool.map(run, todo)))
    pages = [sid for sid in todo if isinstance(done[sid], dict)]
    rows = {str(r["slide_id"]): r for r in ok.to_dict("records")}
    stops = VD.colorbar_stops()
    for i, sid in enumerate(pages):
        res = done[sid]
        assert isinstance(res, dict)
        row = rows[sid]
        probs = {c: None if pd.isna(row.get(f"prob_{c}")) else float(row[f"prob_{c}"]) for c in class_names}
        pred = row.get("pred_class")
        if not isinstance(pred, str):
            pred = max(class_names, key=lambda c: -1.0 if probs[c] is None else float(probs[c] or 0.0))
        links = PageLinks(prev=f"{pages[i - 1]}.html" if i > 0 else None,
                          next=f"{pages[i + 1]}.html" if i + 1 < len(pages) else None)
        html = render_viewer_page(res["data"], pred, probs, (truth or {}).get(sid), stops, links)
        write_text(out / f"{sid}.html", html)
        result.pages[sid] = f"{VIEWER_DIR}/{sid}.html"
        result.built += int(res["built"])
        result.reused += int(not res["built"])
        result.tiles += int(res["record"]["tiles"])
        result.bytes += int(res["record"]["bytes"])
    result.skipped.update({sid: str(done[sid]) for sid in todo if isinstance(done[sid], str)})
    if result.skipped:
        result.notes.append(f"No viewer for {len(result.skipped)} slide(s): "
                            + "; ".join(f"{k} ({v})" for k, v in list(result.skipped.items())[:5]))
    result.seconds = time.perf_counter() - start
    log.info("%d viewers (%d built, %d reused; %d tiles, %.1f MB) in %.1f s -> %s", len(result.pages), result.built,
             result.reused, result.tiles, result.bytes / 1e6, result.seconds, out)
    return result
