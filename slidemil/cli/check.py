"""`slidemil check`: h5 files, features folders, checkpoints and model packages against their contracts."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.cli.common import Command

log = logging.getLogger("slidemil")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path,
                   help="coords/features h5 files or folders, features or run folders, checkpoints, model packages")
    p.add_argument("--all", action="store_true", help="list every file, not only those with problems")
    p.add_argument("--json", type=Path, help="also write the findings to this JSON file")


def run(args: argparse.Namespace) -> int:
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


COMMANDS = (Command("check", "check h5 files, features folders, checkpoints and model packages against their "
                    "contracts", _options, run),)
