"""`slidemil tile`: tissue and the tile grid of each slide, as coords h5 files."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidemil.cli.common import Command, add_config_option, add_tiling_options, report_batch, tiling_overrides


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", help="folder (searched recursively), glob, or CSV with slide_id,path[,mpp]")
    p.add_argument("--out", type=Path, required=True)
    add_tiling_options(p)
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel processes")
    add_config_option(p)


def run(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.slide.tiling import TilingConfig
    from slidemil.tile import tile_slides
    cfg = load_config(TilingConfig, args.config, tiling_overrides(args))
    batch = tile_slides(args.slides, args.out, cfg, slide_mpp=args.slide_mpp, workers=args.workers)
    return report_batch(batch)


COMMANDS = (Command("tile", "detect tissue and write the tile grid of each slide (coords h5)", _options, run),)
