"""`slidemil heatmap`: score's per-slide outputs from stored features, running the head only."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.choices import AttentionNorm, choices_of
from slidemil.cli.common import Command, add_config_option

log = logging.getLogger("slidemil")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("features", type=Path, help="a features h5 file, `slidemil extract`'s folder, or its features/")
    p.add_argument("--model", type=Path, required=True, help="a model package, or a checkpoint whose head to run")
    p.add_argument("--out", type=Path, required=True, help="output folder (score's layout)")
    p.add_argument("--slides", help="the slide files (folder, glob or CSV) for thumbnails, tissue and top-k tiles")
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp for every slide file")
    p.add_argument("--attention-norm", choices=choices_of(AttentionNorm))
    p.add_argument("--top-k", type=int, help="most attended tiles saved per slide (8; needs --slides)")
    p.add_argument("--no-geojson", action="store_true", help="skip the QuPath GeoJSON files")
    p.add_argument("--no-smooth", action="store_true", help="draw the tile squares, not the smoothed map")
    p.add_argument("--smooth-sigma", type=float, help="Gaussian width of the smoothed map in tiles (0.5)")
    p.add_argument("--no-viewer-files", action="store_true", help="skip the OME-TIFF overlay and QuPath annotations")
    p.add_argument("--overlay-px-per-tile", type=int, help="pixels per tile of the OME-TIFF overlay (4)")
    p.add_argument("--threads", type=int, help="CPU threads of the head")
    add_config_option(p)


def run(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.engine.heatmap_from_features import HeatmapConfig, heatmaps_from_features
    overrides = {"attention_norm": args.attention_norm, "top_k": args.top_k,
                 "geojson": False if args.no_geojson else None, "smooth": False if args.no_smooth else None,
                 "smooth_sigma": args.smooth_sigma, "viewer_files": False if args.no_viewer_files else None,
                 "overlay_pixels_per_tile": args.overlay_px_per_tile, "threads": args.threads}
    cfg = load_config(HeatmapConfig, args.config, overrides)
    summary = heatmaps_from_features(args.features, args.model, args.out, cfg, slides=args.slides,
                                     slide_mpp=args.slide_mpp)
    log.info("%d slides (%d failed), %s s per slide -> %s", summary["slides"], summary["failures"],
             summary["seconds_per_slide"], args.out)
    return 0


COMMANDS = (Command("heatmap", "heatmaps, GeoJSON and viewer files from stored features, without re-reading the "
                    "slides (the head only)", _options, run),)
