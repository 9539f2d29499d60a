"""What every command module of the CLI shares: the ``Command`` record and the option blocks used by
several commands (tiling, reading, ``--config``), each defined once here."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidemil.choices import DecodeMode, TileSourceKind, TissueMethod, choices_of

log = logging.getLogger("slidemil")


@dataclass(frozen=True)
class Command:
    """A sub-command: its name, help line, a function adding its options, and the function running it.

    ``run`` parses nothing itself: it turns the parsed options into the stage's typed config and calls
    one library function; it returns the exit status.
    """

    name: str
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- shared option blocks ------------------------------------------------------------------
def add_tiling_options(p: argparse.ArgumentParser) -> None:
    """Tile geometry and tissue options (``tile``, ``extract --tile``, ``score`` overrides)."""
    g = p.add_argument_group("tiling")
    g.add_argument("--patch-size", type=int, help="tile size in pixels at the target mpp (256)")
    g.add_argument("--mpp", type=float, help="target microns per pixel (0.5 = 20x)")
    g.add_argument("--overlap", type=int, help="overlap of neighbouring tiles in target pixels (0)")
    g.add_argument("--min-tissue", type=float,
                   help="minimum tissue fraction of a tile (0.25; a tissue fragment below it still gets its tiles)")
    g.add_argument("--allow-upsample", action="store_true", default=None,
                   help="tile slides scanned coarser than --mpp (their tiles are blown up; refused by default)")
    g.add_argument("--mask-dir", help="folder of user tissue masks <slide_id>_mask.png (any size)")
    g.add_argument("--tissue", choices=choices_of(TissueMethod), help="tissue detection method (otsu)")
    g.add_argument("--slide-mpp", type=float, help="level-0 mpp for every slide (overrides the files)")


def tiling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"tile.patch_size": args.patch_size, "tile.mpp": args.mpp, "tile.overlap": args.overlap,
            "tile.min_tissue": args.min_tissue, "tile.allow_upsample": args.allow_upsample,
            "tissue.mask_dir": args.mask_dir, "tissue.method": args.tissue}


def add_reading_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading")
    g.add_argument("--batch-size", type=int,
                   help="tiles per batch (default: 32 on a CPU; on a GPU from its free memory and the model, at most "
                        "512, halved on out-of-memory)")
    g.add_argument("--workers", type=int, help="reader threads (2)")
    g.add_argument("--tile-source", choices=choices_of(TileSourceKind), help="how tiles are read (auto)")
    g.add_argument("--decode", choices=choices_of(DecodeMode),
                   help="where JPEG tiles are decoded: auto (on the GPU when the model runs on one, with nvJPEG), "
                        "cpu (in the reader threads), device (on the model's device, even a CPU)")
    g.add_argument("--shard", help="I/N: process the I-th of N shards of the slide list (SLURM arrays)")
    g.add_argument("--devices",
                   help="several devices of this node, one worker process each over a shared slide queue: all "
                        "(every GPU), GPU indices 0,1,..., or cpu:N (N CPU workers)")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of settings; command-line options override it")


def report_batch(batch: Any) -> int:
    """Log a batch table's outcome; the exit status stays 0 (failures are rows, not a crash)."""
    rows = list(batch.rows.values())
    failed = [r for r in rows if r.get("status") != "ok"]
    log.info("%d slides ok, %d failed; table: %s", len(rows) - len(failed), len(failed), batch.path)
    for r in failed:
        log.warning("  %s: %s", r["slide_id"], r.get("error"))
    return 0
