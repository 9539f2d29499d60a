"""CLI shim of `slidemil extract`."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidemil.choices import CompileMode, DeviceKind, ExtractBackend, choices_of
from slidemil.cli.common import (
    Command,
    add_config_option,
    add_reading_options,
    add_tiling_options,
    report_batch,
    tiling_overrides,
)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", help="folder, glob, or CSV with slide_id,path[,mpp]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--coords", type=Path, help="output folder of `slidemil tile` (omit with --tile)")
    p.add_argument("--tile", action="store_true", help="tile on the fly with the tiling options")
    p.add_argument("--backbone", help="backbone name (resnet50_trunc, uni, any timm name, hf-hub:...)")
    p.add_argument("--weights", help="random | pretrained | path to a weights file")
    p.add_argument("--checkpoint", help="end-to-end checkpoint whose fine-tuned backbone to use")
    p.add_argument("--backend", choices=choices_of(ExtractBackend))
    p.add_argument("--device", choices=choices_of(DeviceKind))
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on a GPU, bf16 with OpenVINO where the CPU has it, else fp32 (recorded in the h5)")
    p.add_argument("--torch-compile", choices=choices_of(CompileMode),
                   help="torch backend: torch.compile the backbone (auto: with bf16 on the CPU)")
    p.add_argument("--limit-tiles", type=int, help="at most this many tiles per slide (quick looks)")
    add_reading_options(p)
    add_tiling_options(p)
    add_config_option(p)


def run(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.errors import ConfigError
    from slidemil.features.extract import ExtractConfig, extract_features
    if (args.coords is None) == (not args.tile):
        raise ConfigError("give --coords DIR (from `slidemil tile`) or --tile, not both")
    overrides = {"backbone": args.backbone, "weights": args.weights, "checkpoint": args.checkpoint,
                 "backend": args.backend, "device": args.device, "precision": args.precision,
                 "torch_compile": args.torch_compile, "reading.batch_size": args.batch_size, "reading.workers": args.workers,
                 "reading.tile_source": args.tile_source, "reading.decode": args.decode, "reading.max_tiles": args.limit_tiles,
                 **{f"tiling.{k}": v for k, v in tiling_overrides(args).items()}}
    cfg = load_config(ExtractConfig, args.config, overrides)
    if args.devices:
        from slidemil.features.multi_device import extract_on_devices
        batch = extract_on_devices(args.slides, args.out, cfg, args.devices, coords_dir=args.coords,
                                   slide_mpp=args.slide_mpp, shard=args.shard)
    else:
        batch = extract_features(args.slides, args.out, cfg, coords_dir=args.coords, slide_mpp=args.slide_mpp,
                                 shard=args.shard)
    return report_batch(batch)


COMMANDS = (
    Command("extract", "extract tile features of each slide into CLAM/TRIDENT-style h5 files",
            _options, run),
)
