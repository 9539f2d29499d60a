"""`slidemil demo`: the whole pipeline on a built-in synthetic cohort, ending with a summary table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from slidemil.cli.common import Command


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("slidemil-demo"), help="output folder (slidemil-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller cohort and backbone (about 2 minutes)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from slidemil.atomic import write_json
    from slidemil.demo import DemoConfig, format_table, run_demo
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = dataclasses.replace(cfg, seed=args.seed)
    figures = run_demo(args.out, cfg)
    sys.stdout.write(format_table(figures) + "\n")
    write_json(args.out / "demo_summary.json", figures)
    return 0


COMMANDS = (Command("demo", "run the whole pipeline on a built-in synthetic cohort", _options, run),)
