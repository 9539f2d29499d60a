"""Extraction efficiency: tiles/s of `slidemil extract` against model-only tiles/s of the same runner.

Run by hand from the repository root (package installed): ``python bench/extract.py [--backbone
resnet50_trunc] [--backend torch|onnxruntime|openvino|auto] [--precision auto|fp32|bf16|fp16]
[--size 8192] [--n-slides 2] [--batch 32] [--workers 2] [--runs 3]``.

A synthetic cohort is tiled once; then, ``--runs`` times in turn: the backbone runner alone on real
tiles already in memory, at the same batch size, and ``python -m slidemil extract`` in a fresh process
(reading, batching, backbone, h5 writing), its tiles/s from ``extraction.csv`` (after the model is
built) and its peak RSS. Prints medians with min-max and the ratio (the pipeline's efficiency).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import real_tiles  # noqa: E402

from slidemil.features.extract import ExtractConfig, build_backbone_runner, prepare_backbone  # noqa: E402
from slidemil.slide.synth import SynthConfig, make_cohort  # noqa: E402
from slidemil.slide.tiling import TilingConfig
from slidemil.tile import tile_slides  # noqa: E402


def model_only(args: argparse.Namespace, tiles, work: Path) -> float:
    cfg = ExtractConfig(backbone=args.backbone, backend=args.backend, precision=args.precision, device="cpu")
    module, card = prepare_backbone(cfg, work / "model_only")
    with build_backbone_runner(module, card, args.backend, "cpu", args.precision, work / "model_only", 256) as runner:
        batches = [tiles[i:i + args.batch] for i in range(0, len(tiles), args.batch)]
        runner.infer({"tiles": batches[0]})
        start = time.perf_counter()
        for b in batches:
            runner.infer({"tiles": b})
        return len(tiles) / (time.perf_counter() - start)


def extract_run(args: argparse.Namespace, work: Path, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "slidemil", "extract", str(work / "cohort" / "slides"), "--coords", str(work / "tiles"),
           "--out", str(out), "--backbone", args.backbone, "--backend", args.backend, "--precision", args.precision,
           "--device", "cpu", "--batch-size", str(args.batch), "--workers", str(args.workers)]
    # GNU time measures its own child, which it forks small: ru_maxrss of a child forked from this
    # (large) benchmark process would include the benchmark's memory.
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=subprocess.DEVNULL, stderr=log_file)
    if proc.returncode:
        raise RuntimeError(f"extract failed, see {log_path}")
    peak_kb = next(int(line.split()[1]) for line in log_path.read_text().splitlines() if line.startswith("PEAK_KB"))
    table = pd.read_csv(out / "extraction.csv")
    return table.n_tiles.sum() / table.seconds.sum(), peak_kb / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--backend", default="torch")
    p.add_argument("--precision", default="auto")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model-tiles", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, seed=0), progress=False)
    tile_slides(work / "cohort" / "slides", work / "tiles")
    tiles = real_tiles(next((work / "cohort" / "slides").glob("*.svs")), TilingConfig(), args.model_tiles)
    model_rates, e2e_rates, peaks = [], [], []
    for run in range(args.runs):
        model_rates.append(model_only(args, tiles, work))
        rate, peak = extract_run(args, work, work / f"extract_{run}")
        e2e_rates.append(rate)
        peaks.append(peak)
        print(f"run {run}: model-only {model_rates[-1]:.1f} tiles/s, extract {rate:.1f} tiles/s, peak RSS {peak:.0f} MB")
    ratios = [e / m for e, m in zip(e2e_rates, model_rates)]
    med = statistics.median
    print(f"\n{args.backbone}, backend {args.backend}, precision {args.precision}, batch {args.batch}, "
          f"{args.workers} reader threads\n| measure | median | min | max |\n|---|---|---|---|\n"
          f"| model-only tiles/s | {med(model_rates):.1f} | {min(model_rates):.1f} | {max(model_rates):.1f} |\n"
          f"| extract tiles/s | {med(e2e_rates):.1f} | {min(e2e_rates):.1f} | {max(e2e_rates):.1f} |\n"
          f"| efficiency | {med(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |\n"
          f"| peak RSS of extract, MB | {med(peaks):.0f} | {min(peaks):.0f} | {max(peaks):.0f} |")


if __name__ == "__main__":
    main()
