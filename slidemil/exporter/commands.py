"""CLI shims of `slidemil export`, `build-engine`, `verify` and `quantize`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidemil.cli import add_config_option, command

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
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], help="torch ONNX exporter (auto)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT fp16 engines (needs a GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing package at --out")
    _parity_option(p)
    add_config_option(p)


@command("export", "export a checkpoint as a model package (ONNX graphs, torch weights, manifest)", _export_options)
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


@command("build-engine", "build TensorRT engines for this GPU into a model package", _engine_options)
def _build_engine(args: argparse.Namespace) -> int:
    from slidemil.config import load_config
    from slidemil.exporter.package import read_manifest
    from slidemil.exporter.tensorrt import TensorRTConfig, build_package_engines
    from slidemil.exporter.verify import ParityConfig
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
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "int8"], default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-parity", action="store_true", help="only schema, checksums and smoke inference")
    _parity_option(p)


@command("verify", "check a model package: schema, checksums, smoke inference, parity of a backend", _verify_options)
def _verify(args: argparse.Namespace) -> int:
    from slidemil.exporter.verify import ParityConfig, verify_package
    parity = None if args.no_parity else ParityConfig(slide=str(args.parity_slide) if args.parity_slide else None)
    report = verify_package(args.model_dir, backend=args.backend, precision=args.precision, device=args.device,
                            parity=parity)
    for line in report.lines():
        log.info("%s", line)
    log.info("%s: %s", args.model_dir, "verified" if report.ok else "FAILED")
    return 0 if report.ok else 1


def _quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="model package folder")
    p.add_argument("--slides", required=True,
                   help="folder, glob or CSV of slides like those you will score (calibration and parity tiles)")
    p.add_argument("--tiles", type=int, default=300, help="calibration tiles (300)")
    p.add_argument("--parity-tiles", type=int, default=128, help="other tiles on which int8 is checked (128)")
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp for slides whose files lack it")
    p.add_argument("--seed", type=int, default=0)


@command("quantize", "add an int8 OpenVINO backbone to a package, calibrated on your slides and checked", _quantize_options)
def _quantize(args: argparse.Namespace) -> int:
    from slidemil.exporter.quantize import QuantizeConfig, quantize_package
    cfg = QuantizeConfig(calibration_tiles=args.tiles, parity_tiles=args.parity_tiles, seed=args.seed)
    pkg = quantize_package(args.model_dir, args.slides, cfg, slide_mpp=args.slide_mpp)
    figures = pkg.manifest.openvino["int8"]["parity"]  # type: ignore[index]
    log.info("int8 backbone added to %s: |d prob| %.2e vs onnxruntime fp32, argmax agreement %.4f",
             pkg.root, figures["probabilities"]["max_abs"], figures["argmax_agreement"])
    return 0
