"""`slidemil score --devices ...`: one scoring worker per device over one shared queue of slides.

The parent loads the package's manifest (class names), leaves out the slides whose outputs are
complete and removes what a killed run left, once; the workers (:func:`slidemil.runtime.devices.run_on_devices`)
then each run :func:`slidemil.engine.score.score_slides` on the slides they claim, into the same output
folder. Each writes ``run_summary.<device>.json``; the parent writes ``run_summary.json`` over all of
them (``devices``: which worker scored which slides).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from slidemil.artifacts.package import load_package
from slidemil.engine.outputs import PredictionsTable, slide_paths, write_run_summary
from slidemil.engine.score import ScoreConfig, _complete, score_slides
from slidemil.engine.viewer_files import viewer_paths
from slidemil.jobs import pending
from slidemil.runtime.devices import SlideClaims, parse_devices, run_on_devices
from slidemil.slide.table import load_slides, select_shard

log = logging.getLogger(__name__)


def score_on_devices(model_dirs: list[str | Path], slides: str | Path, out_dir: str | Path, devices: str,
                     cfg: ScoreConfig | None = None, slide_mpp: float | None = None,
                     shard: str | None = None) -> dict[str, Any]:
    """Score the slides with one worker process per device of ``devices`` (see ``parse_devices``); returns
    the run summary over all workers."""
    out, cfg = Path(out_dir), cfg or ScoreConfig()
    start = time.perf_counter()
    workers = parse_devices(devices)
    entries = select_shard(load_slides(slides, slide_mpp), shard)
    class_names = list(load_package(model_dirs[0], check_checksums=False).class_names)  # workers verify them
    with PredictionsTable(out, class_names) as table:
        todo = pending(entries, table, lambda e: _complete(out, e.slide_id, cfg),
                       lambda e: [*slide_paths(out, e.slide_id).values(), *viewer_paths(out, e.slide_id).values()])
    log.info("%d slides to score (%d already done) on %s", len(todo), len(entries) - len(todo), devices)
    summaries = run_on_devices(_score_worker, workers, todo, ([str(m) for m in model_dirs], str(slides), str(out),
                                                               cfg, slide_mpp))
    summary = merge_summaries(summaries, time.perf_counter() - start)
    write_run_summary(out / "run_summary.json", **summary)
    return summary


def _score_worker(device: str, threads: int | None, claims: SlideClaims, model_dirs: list[str], slides: str,
                  out: str, cfg: ScoreConfig, slide_mpp: float | None) -> dict[str, Any]:
    cfg = replace(cfg, device=device, threads=cfg.threads or threads)
    return score_slides(list(model_dirs), slides, out, cfg, slide_mpp=slide_mpp, claims=claims)


def merge_summaries(summaries: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One run summary over the workers': totals over the wall time of the whole run, and each worker's own."""
    tiles = sum(s.get("total_tiles") or 0 for s in summaries)
    scored = sum(s.get("scored_this_run") or 0 for s in summaries)
    load = max((s.get("model_load_seconds") or 0 for s in summaries), default=0.0)
    failed = sorted({sid for s in summaries for sid in s.get("failed_slides") or []})
    return {"slides": max((s.get("slides") or 0 for s in summaries), default=0), "scored_this_run": scored,
            "failures": len(failed), "failed_slides": failed, "total_tiles": tiles, "wall_seconds": round(wall, 3),
            "model_load_seconds": load, "slides_per_hour": round(3600 * scored / wall, 1) if wall > 0 else None,
            "tiles_per_s": round(tiles / wall, 2) if wall > 0 else None,
            "tiles_per_s_after_load": round(tiles / (wall - load), 2) if wall > load else None,
            "backend": summaries[0].get("backend") if summaries else None,
            "devices": [{"device": s.get("device"), "slides": s.get("claimed"),
                         **{k: s.get(k) for k in ("total_tiles", "tiles_per_s_after_load", "plan", "peak_gpu_mb",
                                                  "peak_rss_mb")}} for s in summaries]}
