"""`slidemil doctor`: what this machine can run before a long job, as a table (and JSON), with a verdict."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slidemil.cli.common import Command


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="a model package: it must load, and the runner score would use must run")
    p.add_argument("--backbone", help="a backbone name (uni, resnet50_trunc, hf-hub:...): are its weights cached here?")
    p.add_argument("--out", type=Path, help="the output folder the job will write to (free space, writable)")
    p.add_argument("--json", type=Path, help="also write the report to this JSON file")
    p.add_argument("--online", action="store_true",
                   help="also ask the Hugging Face hub whether the backbone is reachable (never under HF_HUB_OFFLINE)")


def run(args: argparse.Namespace) -> int:
    from slidemil.doctor import format_report, run_doctor, write_report_json
    report = run_doctor(args.out, args.model, args.backbone, args.online)
    sys.stdout.write("\n".join(format_report(report)) + "\n")
    if args.json:
        write_report_json(report, args.json)
    return report.exit_code


COMMANDS = (Command("doctor", "check this machine for a job: libraries, CPU features, GPU, backends, OpenSlide, "
                    "disk, weights, a model package (exit 0 ready, 1 warnings, 2 cannot run)", _options, run),)
