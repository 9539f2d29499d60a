"""CLI shim of `slidemil score`."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidemil.choices import AttentionNorm, Backend, CompileMode, DeviceKind, Precision, choices_of
from slidemil.cli.common import Command, add_config_option, add_reading_options


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="model package (from `slidemil export`)")
    p.add_argument("slides", help="folder, glob, or CSV with slide_id,path[,mpp]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="another package to ensemble with (repeatable; probabilities are averaged)")
    p.add_argument("--backend", choices=choices_of(Backend))
    p.add_argument("--device", choices=choices_of(DeviceKind))
    p.add_argument("--precision", choices=choices_of(Precision),
                   help="auto: fp16 on a GPU; on the CPU OpenVINO's int8 backbone where quantized, else bf16 "
                        "where the CPU has it, else fp32")
    p.add_argument("--threads", type=int, help="CPU threads for the runners (default: the cores given)")
    p.add_argument("--torch-compile", choices=choices_of(CompileMode),
                   help="torch backend: torch.compile the backbone (auto: with bf16 on the CPU)")
    p.add_argument("--attention-norm", choices=choices_of(AttentionNorm))
    p.add_argument("--top-k", type=int, help="most attended tiles saved per slide (8; 0 = none)")
    p.add_argument("--heatmap-overlap", type=float, help="extra overlapping grid for a smoother map (e.g. 0.5)")
    p.add_argument("--no-geojson", action="store_true", help="skip the QuPath GeoJSON files")
    p.add_argument("--no-viewer-files", action="store_true",
                   help="skip the OME-TIFF attention overlay and the QuPath annotations (tissue, top tiles)")
    p.add_argument("--min-tissue", type=float, help="override the package's minimum tissue fraction")
    p.add_argument("--allow-upsample", action="store_true", default=None,
                   help="score slides scanned coarser than the model's mpp (their tiles are blown up)")
    p.add_argument("--mask-dir", help="folder of user tissue masks <slide_id>_mask.png")
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp for every slide (overrides the files)")
    add_reading_options(p)
    add_config_option(p)


def run(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.engine.score import ScoreConfig, score_slides
    overrides = {"backend": args.backend, "device": args.device, "precision": args.precision,
                 "threads": args.threads, "torch_compile": args.torch_compile, "attention_norm": args.attention_norm, "top_k": args.top_k,
                 "heatmap_overlap": args.heatmap_overlap, "geojson": False if args.no_geojson else None,
                 "viewer_files": False if args.no_viewer_files else None,
                 "min_tissue": args.min_tissue, "allow_upsample": args.allow_upsample, "mask_dir": args.mask_dir,
                 "reading.batch_size": args.batch_size, "reading.workers": args.workers,
                 "reading.tile_source": args.tile_source, "reading.decode": args.decode}
    cfg = load_config(ScoreConfig, args.config, overrides)
    if args.devices:
        from slidemil.engine.multi_device import score_on_devices
        summary = score_on_devices([args.model_dir, *args.model], args.slides, args.out, args.devices, cfg,
                                   slide_mpp=args.slide_mpp, shard=args.shard)
    else:
        summary = score_slides([args.model_dir, *args.model], args.slides, args.out, cfg, slide_mpp=args.slide_mpp,
                               shard=args.shard)
    import logging
    logging.getLogger("slidemil").info(
        "%d slides (%d failed), %s tiles/s, %s slides/h -> %s", summary["slides"], summary["failures"],
        summary["tiles_per_s"], summary["slides_per_hour"], args.out)
    return 0


COMMANDS = (
    Command("score", "score slides with a model package: predictions, heatmaps, GeoJSON, top tiles",
            _options, run),
)
