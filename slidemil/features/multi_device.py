"""`slidemil extract --devices ...`: one extraction worker per device over one shared queue of slides.

As :mod:`slidemil.engine.multi_device` for scoring: the parent leaves out the slides whose features
file is complete (removing what a killed run left) once; each worker runs
:func:`slidemil.features.extract.extract_features` on the slides it claims, into the same folder, and
appends its rows to ``extraction.csv`` under its lock.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from slidemil.features.extract import (
    EXTRACT_COLUMNS,
    ExtractConfig,
    extract_features,
    pending_slides,
    select_slides,
)
from slidemil.jobs import ResultsTable
from slidemil.runtime.devices import SlideClaims, parse_devices, run_on_devices

log = logging.getLogger(__name__)


def extract_on_devices(slides: str | Path, out_dir: str | Path, cfg: ExtractConfig, devices: str,
                       coords_dir: str | Path | None = None, slide_mpp: float | None = None,
                       shard: str | None = None) -> ResultsTable:
    """Extract features with one worker process per device of ``devices``; returns the results table."""
    out = Path(out_dir)
    workers = parse_devices(devices)
    entries = select_slides(slides, slide_mpp, shard, coords_dir)
    with ResultsTable(out / "extraction.csv", EXTRACT_COLUMNS) as table:
        todo = pending_slides(entries, out, table)
    log.info("%d slides to extract (%d already done) on %s", len(todo), len(entries) - len(todo), devices)
    run_on_devices(_extract_worker, workers, todo, (str(slides), str(out), cfg,
                                                    None if coords_dir is None else str(coords_dir), slide_mpp))
    return ResultsTable(out / "extraction.csv", EXTRACT_COLUMNS)


def _extract_worker(device: str, threads: int | None, claims: SlideClaims, slides: str, out: str, cfg: ExtractConfig,
                    coords_dir: str | None, slide_mpp: float | None) -> dict[str, Any]:
    table = extract_features(slides, out, replace(cfg, device=device), coords_dir, slide_mpp, claims=claims)
    rows = [table.rows[s] for s in claims.claimed if s in table.rows]
    return {"total_tiles": sum(r.get("n_tiles") or 0 for r in rows),
            "failed_slides": [r["slide_id"] for r in rows if r.get("status") != "ok"]}
