"""`slidemil synth`: a synthetic cohort of pyramidal SVS slides with known lesions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.cli.common import Command

log = logging.getLogger("slidemil")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path)
    p.add_argument("--n-slides", type=int, default=8)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--size", type=int, default=8192, help="level-0 width in pixels")
    p.add_argument("--lesion-fraction", type=float, default=0.03, help="lesion area / tissue area")
    p.add_argument("--n-lesions", type=int, help="lesions per positive slide (default: a few)")
    p.add_argument("--subtle", action="store_true", help="lesions closer in appearance to normal tissue")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from slidemil.slide.synth import SynthConfig, make_cohort
    cfg = SynthConfig(n_slides=args.n_slides, n_classes=args.classes, size=args.size,
                      lesion_fraction=args.lesion_fraction, n_lesions=args.n_lesions, subtle=args.subtle,
                      seed=args.seed)
    table = make_cohort(args.out, cfg)
    log.info("wrote %d slides to %s", len(table), args.out)
    return 0


COMMANDS = (Command("synth", "write a synthetic cohort of pyramidal SVS slides with known lesions", _options, run),)
