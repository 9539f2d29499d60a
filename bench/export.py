"""Export benchmark: parity, export time, file sizes, and CPU throughput of ``backbone.onnx`` vs torch eager.

Run by hand from the repository root: ``python bench/export.py [--backbone resnet50_trunc] [--tile-px 224]
[--batch 32] [--batches 4] [--runs 5] [--threads 2] [--weights random|pretrained|FILE] [--out DIR]``.

A checkpoint in the trainer's format (the backbone with its card and weights in ``backbone/``, a gated
attention-MIL head) is written with :func:`slidemil.artifacts.checkpoint.save_checkpoint` and exported
with fp16 graphs, as ``slidemil export --fp16`` does (parity on real tiles of a synthetic slide,
bags of 1, 500 and 20,000 tiles). Then, in one process and on the same real tiles, each runner is
timed side by side, round-robin, ``--runs`` times over ``--batches`` batches of ``--batch`` tiles after
one warm-up batch, with ``--threads`` threads:

- torch eager fp32, NCHW, as CLAM and TRIDENT run it (uint8 -> normalised floats -> model);
- torch eager fp32, channels_last (the engine's TorchRunner);
- ONNX Runtime CPU fp32 on ``backbone.onnx`` (uint8 in, normalisation inside the graph);
- OpenVINO on ``backbone.onnx`` at fp32 and bf16, where installed.

Besides wall-clock tiles/s, ``tiles/cpu-s`` is tiles per CPU second of the process (all its threads):
other load on a shared machine changes it much less than it changes wall-clock rates.

Prints a table of medians (tiles/s), and writes ``bench_export.json`` into ``--out`` (a temporary folder if
not given). Weights are random unless ``--weights`` says otherwise: parity and speed do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slidemil import config
from slidemil.artifacts.checkpoint import save_checkpoint
from slidemil.artifacts.package import Package, load_torch_models
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import parity_tiles
from slidemil.models.backbones import create_backbone, save_backbone
from slidemil.models.mil import HeadConfig, create_head
from slidemil.runtime.plan import ExecutionPlan, ModelFiles, build_backbone_runner
from slidemil.slide.grid import TileSpec
from slidemil.slide.tiling import TilingConfig


def make_checkpoint(root: Path, backbone_name: str, weights: str, tile_px: int) -> Path:
    """A features-mode checkpoint: backbone folder + gated head, two classes."""
    torch.manual_seed(0)
    backbone, card = create_backbone(backbone_name, weights)
    card = save_backbone(backbone, card, root / "backbone")
    head = create_head(HeadConfig(mil_type="gated", in_dim=card.feature_dim, n_classes=2))
    tiling = TilingConfig(tile=TileSpec(patch_size=tile_px, mpp=0.5))
    meta = {"mode": "features", "epoch": 0, "metrics": {}, "class_names": ["normal", "tumour"],
            "head_config": head.config.to_dict(), "backbone_card": card.to_dict(), "backbone_weights": "backbone/",
            "tiling": config.to_dict(tiling), "train_config": {}}
    # the backbone folder sits beside the checkpoint, as in a features-mode run folder
    return save_checkpoint(root / "checkpoint_best", {f"head.{k}": v for k, v in head.state_dict().items()}, meta)


def runners(pkg: Package, threads: int) -> dict[str, Callable[[np.ndarray], object]]:
    """name -> function(tiles) running one batch to completion."""
    backbone, _ = load_torch_models(pkg)
    mean, std = backbone.mean, backbone.std
    net = backbone.backbone.eval()

    def eager(tiles: np.ndarray) -> object:  # CLAM/TRIDENT style: the dataloader normalises, the model runs NCHW
        with torch.inference_mode():
            x = ((torch.from_numpy(tiles).float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous()
            return net(x)

    out: dict[str, Callable[[np.ndarray], object]] = {"torch eager fp32 (NCHW)": eager}
    files = ModelFiles.from_package(pkg)  # the engine's own runners, as its planner builds them
    plans = {"torch eager fp32 channels_last": ExecutionPlan("torch", "cpu", "fp32", threads),
             "onnxruntime fp32 (backbone.onnx)": ExecutionPlan("onnxruntime", "cpu", "fp32", threads)}
    if files.precisions("openvino"):
        plans.update({f"openvino {p} (backbone.onnx)": ExecutionPlan("openvino", "cpu", p, threads) for p in ("fp32", "bf16")})
    else:
        logging.info("openvino not installed: skipped")
    for name, plan in plans.items():
        runner = build_backbone_runner(files, plan).activate()  # kept active for the whole bench
        out[name] = lambda t, r=runner: r.infer({"tiles": t})
    return out


def throughput(fns: dict[str, Callable[[np.ndarray], object]], tiles: np.ndarray, batch: int, batches: int,
               runs: int) -> dict[str, dict[str, float]]:
    """Median tiles/s of each runner, timed round-robin (one warm-up batch each)."""
    chunks = [tiles[i * batch:(i + 1) * batch] for i in range(batches)]
    rates: dict[str, list[float]] = {name: [] for name in fns}
    cpu_rates: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(chunks[0])
    for _ in range(runs):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            for chunk in chunks:
                fn(chunk)
            rates[name].append(batch * batches / (time.perf_counter() - start))
            cpu_rates[name].append(batch * batches / (time.process_time() - cpu))
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r),
                   "per_cpu_second": statistics.median(cpu_rates[name])} for name, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--weights", default="random")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-export-"))
    ckpt = make_checkpoint(work / "run", args.backbone, args.weights, args.tile_px)
    start = time.perf_counter()
    pkg = export_checkpoint(ckpt, work / "model", ExportConfig(fp16=True, overwrite=True))
    export_s = time.perf_counter() - start
    tiles, source = parity_tiles(pkg.tiling, pkg.tile_px, args.batch * args.batches, seed=1)
    speed = throughput(runners(pkg, args.threads), tiles, args.batch, args.batches, args.runs)
    parity = {k: {"probabilities": v["probabilities"], "features": v["features"], "argmax_agreement": v["argmax_agreement"],
                  "n_bags": v["n_bags"]} for k, v in pkg.manifest.parity.items() if isinstance(v, dict)}
    sizes = {rel: e.bytes for rel, e in pkg.manifest.files.items()}
    result = {"backbone": args.backbone, "tile_px": args.tile_px, "batch": args.batch, "threads": args.threads,
              "runs": args.runs, "tiles": source, "export_seconds": round(export_s, 1),
              "export_seconds_in_manifest": pkg.manifest.export["seconds"], "file_bytes": sizes,
              "parity": parity, "tiles_per_s": speed, "library_versions": pkg.manifest.library_versions}
    (work / "bench_export.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.backbone} + gated head, {args.tile_px} px tiles, batch {args.batch}, {args.threads} threads "
          f"(tiles: {source}); export {export_s:.1f} s incl. fp16 graphs and parity")
    print("\n| precision | max abs d prob | max abs d feature (rel) | min cosine | argmax agreement |\n|---|---|---|---|---|")
    for name, v in parity.items():
        f = v["features"]
        print(f"| {name} vs torch fp32 | {v['probabilities']['max_abs']:.2e} | {f['max_abs']:.2e} ({f['max_rel']:.2e}) "
              f"| {f['min_cosine']:.6f} | {v['argmax_agreement']:.3f} ({v['n_bags']} bags) |")
    print("\n| file | MB |\n|---|---|")
    for rel, n in sizes.items():
        print(f"| {rel} | {n / 1e6:.1f} |")
    print(f"\n| runner | tiles/s (median of {args.runs}) | min | max | tiles/cpu-s |\n|---|---|---|---|---|")
    for name, s in speed.items():
        print(f"| {name} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | {s['per_cpu_second']:.1f} |")
    print(f"\nwritten: {work / 'bench_export.json'}")


if __name__ == "__main__":
    main()
