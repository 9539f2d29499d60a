"""`slidemil tile`: tissue detection and a tile grid per slide, written as coords h5 files.

One row per slide in ``tiling.csv`` (status, tiles, the slide's mpp, tissue fraction and the share of
it under tiles); the tiling record ``tiling_config.json`` beside them; a preview PNG per slide.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from slidemil.artifacts.tiling_record import coords_path, write_tiling_record
from slidemil.atomic import remove_temporaries_of
from slidemil.jobs import ResultsTable, run_batch
from slidemil.slide.readers import open_slide
from slidemil.slide.store import is_complete, write_h5
from slidemil.slide.table import SlideEntry, load_slides
from slidemil.slide.tiling import TilingConfig, draw_tiling, plan_tiles, write_png

TILING_COLUMNS = ["slide_id", "status", "error", "n_tiles", "slide_mpp", "tissue_fraction", "tissue_coverage",
                  "seconds"]


def tile_slide(entry: SlideEntry, out_dir: Path, cfg: TilingConfig) -> dict[str, Any]:
    """Tile one slide: ``coords/<id>.h5`` and ``masks/<id>.png``; returns its row for tiling.csv."""
    for path in (coords_path(out_dir, entry.slide_id), out_dir / "masks" / f"{entry.slide_id}.png"):
        remove_temporaries_of(path)  # left by a killed run
    with open_slide(entry.path, mpp=entry.mpp, slide_id=entry.slide_id) as reader:
        plan = plan_tiles(reader, cfg)
    write_png(out_dir / "masks" / f"{entry.slide_id}.png", draw_tiling(plan))
    write_h5(coords_path(out_dir, entry.slide_id), plan.grid.coords, plan.attrs)
    return {"n_tiles": len(plan.grid), "slide_mpp": plan.grid.slide_mpp, "tissue_fraction": round(plan.tissue.fraction, 4),
            "tissue_coverage": round(plan.grid.tissue_coverage, 4)}


def tile_slides(slides: str | Path, out_dir: str | Path, cfg: TilingConfig | None = None,
                slide_mpp: float | None = None, workers: int = 1) -> ResultsTable:
    """Tile every slide of a folder, glob or CSV into ``out_dir``; resumes, records failures."""
    cfg = cfg or TilingConfig()
    out = Path(out_dir)
    entries = load_slides(slides, slide_mpp)
    write_tiling_record(out, cfg, slides=str(slides), slide_mpp=slide_mpp)
    return run_batch(entries, functools.partial(tile_slide, out_dir=out, cfg=cfg),
                     is_done=lambda e: is_complete(coords_path(out, e.slide_id)),
                     log_path=out / "tiling.csv", columns=TILING_COLUMNS, desc="tile", workers=workers)
