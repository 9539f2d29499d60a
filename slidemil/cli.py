"""`slidemil <command>`: thin shims over library functions, no logic of their own.

Each command parses its options, builds the typed config of its stage (YAML file via ``--config``,
then command-line overrides) and calls one library function. Option blocks shared by several
commands (tiling, reading, inference) are defined once here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidemil import __version__
from slidemil.errors import SlidemilError

log = logging.getLogger("slidemil")


@dataclass(frozen=True)
class Command:
    """A sub-command: its help line, a function adding its options, and the function running it."""

    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help_text: str, options: Callable[[argparse.ArgumentParser], None]
            ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as sub-command ``name`` with the options ``options`` adds."""
    def decorator(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(help_text, options, run)
        return run
    return decorator


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
    g.add_argument("--tissue", choices=["otsu", "whole", "mask"], help="tissue detection method (otsu)")
    g.add_argument("--slide-mpp", type=float, help="level-0 mpp for every slide (overrides the files)")


def tiling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"tile.patch_size": args.patch_size, "tile.mpp": args.mpp, "tile.overlap": args.overlap,
            "tile.min_tissue": args.min_tissue, "tile.allow_upsample": args.allow_upsample,
            "tissue.mask_dir": args.mask_dir, "tissue.method": args.tissue}


def add_reading_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading")
    g.add_argument("--batch-size", type=int, help="tiles per batch (32)")
    g.add_argument("--workers", type=int, help="reader threads (2)")
    g.add_argument("--tile-source", choices=["auto", "openslide", "jpeg"], help="how tiles are read (auto)")
    g.add_argument("--shard", help="I/N: process the I-th of N shards of the slide list (SLURM arrays)")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of settings; command-line options override it")


# -- commands ---------------------------------------------------------------------------------
def _synth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path)
    p.add_argument("--n-slides", type=int, default=8)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--size", type=int, default=8192, help="level-0 width in pixels")
    p.add_argument("--lesion-fraction", type=float, default=0.03, help="lesion area / tissue area")
    p.add_argument("--n-lesions", type=int, help="lesions per positive slide (default: a few)")
    p.add_argument("--subtle", action="store_true", help="lesions closer in appearance to normal tissue")
    p.add_argument("--seed", type=int, default=0)


@command("synth", "write a synthetic cohort of pyramidal SVS slides with known lesions", _synth_options)
def _synth(args: argparse.Namespace) -> int:
    from slidemil.slide.synth import SynthConfig, make_cohort
    cfg = SynthConfig(n_slides=args.n_slides, n_classes=args.classes, size=args.size,
                      lesion_fraction=args.lesion_fraction, n_lesions=args.n_lesions, subtle=args.subtle,
                      seed=args.seed)
    table = make_cohort(args.out, cfg)
    log.info("wrote %d slides to %s", len(table), args.out)
    return 0


def _tile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", help="folder, glob, or CSV with slide_id,path[,mpp]")
    p.add_argument("--out", type=Path, required=True)
    add_tiling_options(p)
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel processes")
    add_config_option(p)


@command("tile", "detect tissue and write the tile grid of each slide (coords h5)", _tile_options)
def _tile(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.slide.tiling import TilingConfig, tile_slides
    cfg = load_config(TilingConfig, args.config, tiling_overrides(args))
    batch = tile_slides(args.slides, args.out, cfg, slide_mpp=args.slide_mpp, workers=args.workers)
    return report_batch(batch)


def report_batch(batch: Any) -> int:
    """Log a batch table's outcome; the exit status stays 0 (failures are rows, not a crash)."""
    rows = list(batch.rows.values())
    failed = [r for r in rows if r.get("status") != "ok"]
    log.info("%d slides ok, %d failed; table: %s", len(rows) - len(failed), len(failed), batch.path)
    for r in failed:
        log.warning("  %s: %s", r["slide_id"], r.get("error"))
    return 0


def _check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path,
                   help="coords/features h5 files or folders, features or run folders, checkpoints, model packages")
    p.add_argument("--all", action="store_true", help="list every file, not only those with problems")
    p.add_argument("--json", type=Path, help="also write the findings to this JSON file")


@command("check", "check h5 files, features folders, checkpoints and model packages against their contracts",
         _check_options)
def _check(args: argparse.Namespace) -> int:
    from slidemil.atomic import write_json
    from slidemil.check import check_paths
    report = check_paths(args.paths)
    for f in report.findings:
        if not f.ok:
            log.error("FAILED %s (%s): %s", f.path, f.kind, "; ".join(f.problems))
        elif args.all or f.kind not in ("coords", "features"):
            log.info("ok     %s (%s) %s", f.path, f.kind, f.detail)
    if args.json:
        write_json(args.json, {"ok": report.ok, "summary": report.summary(),
                               "findings": [f.to_dict() for f in report.findings]})
    (log.info if report.ok else log.error)("%s", report.summary())
    return 0 if report.ok else 1


# -- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="slidemil", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"slidemil {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.options(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def _load_command_modules() -> None:
    """Commands of later stages live beside their library (``slidemil/<stage>/commands.py``)."""
    import importlib
    for module in ("slidemil.features.commands", "slidemil.trainer.commands", "slidemil.exporter.commands",
                   "slidemil.engine.commands", "slidemil.report.commands", "slidemil.demo"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (exporters, optimisers) only when they warn.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("slidemil").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command].run(args)
    except SlidemilError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
