"""Engine efficiency: end-to-end tiles/s of `slidemil score` against model-only tiles/s, side by side.

Run by hand from the repository root (package installed): ``python bench/score.py [--backbone
resnet50_trunc] [--backend auto|onnxruntime|openvino|torch|tensorrt] [--device auto|cpu|cuda]
[--precision auto|fp32|bf16|fp16] [--size 8192] [--n-slides 2] [--batch 32] [--workers 2] [--runs 3]``.

A synthetic cohort of 20x slides is written, a package is exported from a random-weights checkpoint
of the backbone with a gated head, then, ``--runs`` times in turn:

- model only: the package's backbone runner on real tiles of the cohort, already in memory, at the
  same batch size (what the hardware can do with this runner);
- end to end: ``python -m slidemil score`` in a fresh process (tissue, grid, reading, batching,
  backbone, head, heatmaps, GeoJSON and top-k tiles), tiles/s after the model is loaded, and the
  process's peak RSS.

Prints medians with min-max, and the ratio end-to-end / model-only (the engine's efficiency), and
writes ``bench_score.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import make_checkpoint  # noqa: E402  (bench/export.py: a checkpoint in the trainer's format)

from slidemil.engine.models import open_models  # noqa: E402
from slidemil.exporter.export import ExportConfig, export_checkpoint  # noqa: E402
from slidemil.slide.reader import open_slide  # noqa: E402
from slidemil.slide.synth import SynthConfig, make_cohort  # noqa: E402
from slidemil.slide.tiling import TilingConfig, plan_tiles  # noqa: E402


def real_tiles(slide: Path, tiling: TilingConfig, n: int) -> np.ndarray:
    with open_slide(slide) as reader:
        plan = plan_tiles(reader, tiling)
        coords = plan.grid.coords[np.linspace(0, len(plan.grid) - 1, n).astype(int)]
        return reader.read_tiles(coords, plan.grid.patch_size_level0, tiling.tile.patch_size)


def model_only(model_dir: Path, tiles: np.ndarray, args: argparse.Namespace) -> float:
    with open_models([model_dir], args.backend, args.device, args.precision, args.threads) as models:
        runner = models[0].backbone
        batches = [tiles[i:i + args.batch] for i in range(0, len(tiles), args.batch)]
        runner.infer({"tiles": batches[0]})
        start = time.perf_counter()
        for b in batches:
            runner.infer({"tiles": b})
        return len(tiles) / (time.perf_counter() - start)


def end_to_end(model_dir: Path, slides: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "slidemil", "score", str(model_dir), str(slides), "--out", str(out),
           "--backend", args.backend, "--device", args.device, "--precision", args.precision,
           "--batch-size", str(args.batch), "--workers", str(args.workers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the maximum of all children
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"score failed, see {log_path}")
    summary = json.loads((out / "run_summary.json").read_text())
    # VmHWM of the scoring process itself: ru_maxrss would include this benchmark's memory, copied at fork
    return summary["tiles_per_s_after_load"], summary["peak_rss_mb"] or usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--model-tiles", type=int, default=256, help="tiles timed per model-only run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-score-"))
    make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, seed=0), progress=False)
    ckpt = make_checkpoint(work / "run", args.backbone, "random", args.tile_px)
    export_checkpoint(ckpt, work / "model", ExportConfig(overwrite=True))
    from slidemil.exporter.package import load_package
    tiling = load_package(work / "model").tiling
    tiles = real_tiles(next((work / "cohort" / "slides").glob("*.svs")), tiling, args.model_tiles)
    model_rates, e2e_rates, peaks = [], [], []
    for run in range(args.runs):
        model_rates.append(model_only(work / "model", tiles, args))
        rate, peak = end_to_end(work / "model", work / "cohort" / "slides", work / f"score_{run}", args)
        e2e_rates.append(rate)
        peaks.append(peak)
        print(f"run {run}: model-only {model_rates[-1]:.1f} tiles/s, end-to-end {rate:.1f} tiles/s, peak RSS {peak:.0f} MB")
    ratios = [e / m for e, m in zip(e2e_rates, model_rates)]
    result = {"backbone": args.backbone, "backend": args.backend, "device": args.device, "precision": args.precision,
              "batch": args.batch, "workers": args.workers, "slide_size": args.size, "n_slides": args.n_slides,
              "model_only_tiles_per_s": model_rates, "end_to_end_tiles_per_s": e2e_rates,
              "efficiency": ratios, "peak_rss_mb": peaks}
    (work / "bench_score.json").write_text(json.dumps(result, indent=2))
    med = statistics.median
    print(f"\n| measure | median | min | max |\n|---|---|---|---|\n"
          f"| model-only tiles/s | {med(model_rates):.1f} | {min(model_rates):.1f} | {max(model_rates):.1f} |\n"
          f"| end-to-end tiles/s | {med(e2e_rates):.1f} | {min(e2e_rates):.1f} | {max(e2e_rates):.1f} |\n"
          f"| efficiency (e2e / model) | {med(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |\n"
          f"| peak RSS of score, MB | {med(peaks):.0f} | {min(peaks):.0f} | {max(peaks):.0f} |")
    print(f"results: {work / 'bench_score.json'}")


if __name__ == "__main__":
    main()
