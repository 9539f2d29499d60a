"""`slidemil <command>`: the command line, on the top floor of the package.

Each stage has its module here (``synth``, ``tile``, ``extract``, ``train``, ``export``, ``score``,
``heatmap``, ``report``, ``check``, ``doctor``, ``demo``) with its options and a shim that builds the stage's typed config
(YAML file via ``--config``, then command-line overrides) and calls one library function. The
commands are listed explicitly below; no library module imports the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from slidemil import __version__
from slidemil.cli import check, demo, doctor, export, extract, heatmap, report, score, synth, tile, train
from slidemil.cli.common import Command
from slidemil.errors import SlidemilError

log = logging.getLogger("slidemil")

STAGES = (synth, tile, extract, train, export, score, heatmap, report, check, doctor, demo)
COMMANDS: dict[str, Command] = {c.name: c for stage in STAGES for c in stage.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slidemil", description="Attention-MIL on whole-slide images: train, "
                                     "export, and score slides with heatmaps")
    parser.add_argument("--version", action="version", version=f"slidemil {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.options(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


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
