"""CLI shims of `slidemil evaluate` and `slidemil report`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.cli.common import Command

log = logging.getLogger("slidemil")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", type=Path, help="predictions.csv of `slidemil score` (or test_predictions.csv)")
    p.add_argument("--labels", type=Path, required=True, help="label table: slide_id,label[,patient_id]")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, evaluated.csv and plots/")
    p.add_argument("--by", choices=["slide", "patient"], default="slide",
                   help="score slides, or patients by the mean probability of their slides (slide)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals; 0: none")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--no-plots", action="store_true", help="skip the ROC, PR, confusion and reliability plots")


def _evaluate(args: argparse.Namespace) -> int:
    from slidemil.report.evaluate import evaluate_predictions
    result = evaluate_predictions(args.predictions, args.labels, args.out, by=args.by, n_boot=args.bootstrap,
                                  seed=args.seed, plots=not args.no_plots)
    log.info("metrics of %s\n%s\nwritten to %s", args.predictions, result["table"], args.out / "metrics.json")
    return 0


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="training run, k-fold root, or output folder of `slidemil score`")
    p.add_argument("--labels", type=Path, help="label table slide_id,label[,patient_id] (metrics of scored slides)")
    p.add_argument("--out", type=Path, required=True, help="report folder (index.html, plots/, thumbs/)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals; 0: none")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    v = p.add_argument_group("deep-zoom viewers (scoring outputs)")
    v.add_argument("--slides", help="the slide files (folder, glob or CSV); default: those score_config.json records")
    v.add_argument("--viewer", default="auto",
                   help="auto (all slides of a report of up to 200) | all | none | ID,ID,... | @FILE of ids")
    v.add_argument("--viewer-max-mpp", type=float, help="finest resolution of the pyramids in um/px (full)")
    v.add_argument("--slide-mpp", type=float, help="as given to `slidemil score --slide-mpp`")
    v.add_argument("--viewer-quality", type=int, default=80, help="JPEG quality of the pyramid tiles (80)")


def _report(args: argparse.Namespace) -> int:
    from slidemil.report.report import build_report
    from slidemil.report.viewer import ViewerConfig
    viewer = ViewerConfig(slides=args.slides, which=args.viewer, max_mpp=args.viewer_max_mpp, slide_mpp=args.slide_mpp,
                          quality=args.viewer_quality)
    index = build_report(args.folder, args.out, labels_csv=args.labels, n_boot=args.bootstrap, seed=args.seed,
                         viewer=viewer)
    log.info("open %s", index.resolve().as_uri())
    return 0


COMMANDS = (
    Command("evaluate", "metrics with bootstrap confidence intervals of predictions against a label table",
            _evaluate_options, _evaluate),
    Command("report", "static HTML report of a training run, k-fold run or scoring output",
            _report_options, _report),
)
