"""CLI shims of `slidemil export`, `build-engine`, `verify` and `quantize`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.choices import Exporter, Precision, choices_of
from slidemil.cli.common import Command, add_config_option

log = logging.getLogger("slidemil")


def _parity_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parity-slide", type=Path,
                   help="slide to cut the parity tiles from (default: a synthetic slide)")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint (.safetensors with its .json)")
    p.add_argument("--out", type=Path, required=True, help="model package folder to write")
    p.add_argument("--opset", type=int, help="ONNX opset (18)")
    p.add_argument("--fp16", action="store_true", help="also write fp16 graphs (ONNX Runtime CUDA)")
    p.add_argument("--max-batch", type=int, help="largest backbone batch the engine sends (256)")
    p.add_argument("--exporter", choices=choices_of(Exporter), help="torch ONNX exporter (auto)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT fp16 engines (needs a GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing package at --out")
    _parity_option(p)
    add_config_option(p)


def _export(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.exporter.export import ExportConfig, export_checkpoint
    overrides = {"opset": args.opset, "max_batch": args.max_batch, "exporter": args.exporter,
                 "fp16": args.fp16 or None, "tensorrt": args.tensorrt or None, "overwrite": args.force or None,
                 "parity.slide": str(args.parity_slide) if args.parity_slide else None}
    cfg = load_config(ExportConfig, args.config, overrides)
    pkg = export_checkpoint(args.checkpoint, args.out, cfg)
    for name, figures in pkg.manifest.parity.items():
        if isinstance(figures, dict) and "probabilities" in figures:
            log.info("parity %s: |d prob| %.2e, argmax agreement %.4f", name, figures["probabilities"]["max_abs"],
                     figures["argmax_agreement"])
    log.info("model package written to %s", pkg.root)
    return 0


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="model package folder (from slidemil export)")
    p.add_argument("--fp16", action="store_true", help="build fp16 engines (the default when neither is given)")
    p.add_argument("--fp32", action="store_true", help="build fp32 engines (with --fp16: both)")
    p.add_argument("--max-batch", type=int, help="largest backbone batch (default: the package's)")
    p.add_argument("--max-bag", type=int, help="largest bag of tiles the head engine takes (100000)")
    p.add_argument("--workspace-gb", type=float, help="TensorRT builder workspace limit in GiB (4)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file (default: in ~/.cache/slidemil)")
    _parity_option(p)
    add_config_option(p)


def _build_engine(args: argparse.Namespace) -> int:
    from slidemil.artifacts.package import read_manifest
    from slidemil.config import load_config
    from slidemil.exporter.parity import ParityConfig
    from slidemil.exporter.tensorrt import TensorRTConfig, build_package_engines
    precisions = [p for p, on in (("fp16", args.fp16), ("fp32", args.fp32)) if on]
    overrides = {"precisions": precisions or None, "max_batch": args.max_batch or read_manifest(args.model_dir).max_batch,
                 "max_bag": args.max_bag, "workspace_gb": args.workspace_gb,
                 "timing_cache": str(args.timing_cache) if args.timing_cache else None}
    cfg = load_config(TensorRTConfig, args.config, overrides)
    parity = ParityConfig(slide=str(args.parity_slide) if args.parity_slide else None)
    pkg = build_package_engines(args.model_dir, cfg, parity)
    for precision, figures in pkg.manifest.tensorrt["parity"].items():  # type: ignore[index]
        log.info("tensorrt %s: |d prob| %.2e vs onnxruntime fp32", precision, figures["probabilities"]["max_abs"])
    return 0


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="model package folder")
    p.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt", "torch"], default="onnxruntime",
                   help="backend whose parity is measured (onnxruntime: against torch; others: against "
                        "ONNX Runtime fp32)")
    p.add_argument("--precision", choices=choices_of(Precision), default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-parity", action="store_true", help="only schema, checksums and smoke inference")
    p.add_argument("--json", type=Path, help="also write the report (checks, parity figures: what gates and what "
                                             "informs) to this JSON file")
    _parity_option(p)


def _verify(args: argparse.Namespace) -> int:
    from slidemil.atomic import write_json
    from slidemil.exporter.parity import ParityConfig
    from slidemil.exporter.verify import verify_package
    parity = None if args.no_parity else ParityConfig(slide=str(args.parity_slide) if args.parity_slide else None)
    report = verify_package(args.model_dir, backend=args.backend, precision=args.precision, device=args.device,
                            parity=parity)
    for line in report.lines():
        log.info("%s", line)
    if args.json:
        write_json(args.json, report.to_dict())
    log.info("%s: %s", args.model_dir, "verified" if report.ok else "FAILED")
    return 0 if report.ok else 1


def _quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="model package folder")
    p.add_argument("--slides", required=True,
                   help="folder, glob or CSV of at least 2 slides like those you will score: most calibrate, "
                        "whole held-out ones check the int8 backbone")
    p.add_argument("--tiles", type=int, default=300, help="calibration tiles from the calibration slides (300)")
    p.add_argument("--parity-slides", type=int, default=4,
                   help="most slides held out of calibration to check int8 on (a quarter, at least 1; 4)")
    p.add_argument("--parity-max-tiles", type=int, default=2000,
                   help="a held-out slide with more tissue tiles is checked on a seeded sample of this many (2000)")
    p.add_argument("--parity-tiles", type=int, help=argparse.SUPPRESS)  # before whole-slide parity; ignored
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp for slides whose files lack it")
    p.add_argument("--seed", type=int, default=0)


def _quantize(args: argparse.Namespace) -> int:
    from slidemil.exporter.quantize import QuantizeConfig, quantize_package
    if args.parity_tiles is not None:
        log.warning("--parity-tiles is ignored: int8 is checked on whole held-out slides (--parity-slides, "
                    "--parity-max-tiles)")
    cfg = QuantizeConfig(calibration_tiles=args.tiles, parity_slides=args.parity_slides,
                         parity_max_tiles=args.parity_max_tiles, seed=args.seed)
    pkg = quantize_package(args.model_dir, args.slides, cfg, slide_mpp=args.slide_mpp)
    parity = pkg.manifest.openvino["int8"]["parity"]  # type: ignore[index]
    for s in parity["slides"]:
        log.info("held-out slide %s (%d tiles): |d prob| %.2e, class %s (fp32) / %s (int8)", s["slide_id"],
                 s["n_tiles"], s["probabilities"]["max_abs"], s["classes"]["reference"], s["classes"]["int8"])
    info = parity["information"]
    log.info("information, not gating: one-tile bags |d prob| %.2e, min feature cosine %.6f",
             info["one_tile_bags"]["probabilities"]["max_abs"], info["features"]["min_cosine"])
    log.info("int8 backbone added to %s: whole-slide |d prob| %.2e <= %.0e vs onnxruntime fp32, identical classes",
             pkg.root, parity["probabilities"]["max_abs"], parity["tolerance"])
    return 0


COMMANDS = (
    Command("export", "export a checkpoint as a model package (ONNX graphs, torch weights, manifest)",
            _export_options, _export),
    Command("build-engine", "build TensorRT engines for this GPU into a model package",
            _engine_options, _build_engine),
    Command("verify", "check a model package: schema, checksums, smoke inference, parity of a backend",
            _verify_options, _verify),
    Command("quantize", "add an int8 OpenVINO backbone to a package, calibrated on your slides and checked",
            _quantize_options, _quantize),
)
