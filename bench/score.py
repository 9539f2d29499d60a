"""Engine efficiency and runners side by side: end-to-end tiles/s of `slidemil score` and model-only tiles/s.

Run by hand from the repository root (package installed): ``python bench/score.py [--backbone
resnet50_trunc] [--runners openvino:int8 openvino:bf16 onnxruntime:fp32 torch:fp32:off torch:bf16:off torch:bf16:on]
[--device auto|cpu|cuda] [--size 8192] [--n-slides 2] [--batch 32] [--workers 2] [--runs 3]``.

A runner is ``backend[:precision[:torch-compile]]``. The default list is every CPU runner, OpenVINO
int8 included (the package is then quantized on the cohort's slides; on a GPU: tensorrt, onnxruntime
and torch at fp16). A synthetic cohort of 20x slides is written, a package is
exported from a random-weights checkpoint of the backbone with a gated head, then, ``--runs`` times,
each runner in turn (interleaved, so that a change in machine load hits them all alike):

- model only: the package's backbone runner on real tiles of the cohort, already in memory, at the
  same batch size, streamed through ``infer_stream`` (what the hardware can do with this runner);
- end to end: ``python -m slidemil score`` in a fresh process (tissue, grid, reading, batching,
  backbone, head, heatmaps, GeoJSON and top-k tiles), tiles/s after the model is loaded and warmed
  up, and the process's peak RSS.

Prints, per runner, medians with min-max, the ratio end-to-end / model-only (the engine's
efficiency) and each runner's speed relative to torch fp32 eager (the path CLAM and TRIDENT take),
and writes ``bench_score.json`` into ``--out``.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import make_checkpoint  # noqa: E402  (bench/export.py: a checkpoint in the trainer's format)

from slidemil.engine.models import open_models, warm_up  # noqa: E402
from slidemil.engine.runners import resolve_device  # noqa: E402
from slidemil.exporter.export import ExportConfig, export_checkpoint  # noqa: E402
from slidemil.slide.reader import open_slide  # noqa: E402
from slidemil.slide.synth import SynthConfig, make_cohort  # noqa: E402
from slidemil.slide.tiling import TilingConfig, plan_tiles  # noqa: E402


def real_tiles(slide: Path, tiling: TilingConfig, n: int) -> np.ndarray:
    with open_slide(slide) as reader:
        plan = plan_tiles(reader, tiling)
        coords = plan.grid.coords[np.linspace(0, len(plan.grid) - 1, n).astype(int)]
        return reader.read_tiles(coords, plan.grid.patch_size_level0, tiling.tile.patch_size)


@dataclass(frozen=True)
class RunnerSpec:
    backend: str
    precision: str = "auto"
    compile: str = "off"

    @classmethod
    def parse(cls, text: str) -> RunnerSpec:
        return cls(*text.split(":"))

    def __str__(self) -> str:
        name = f"{self.backend} {self.precision}"
        return name + (" compiled" if self.backend == "torch" and self.compile == "on" else "")


DEFAULT_RUNNERS = {"cpu": ["openvino:int8", "openvino:bf16", "onnxruntime:fp32", "torch:fp32:off", "torch:bf16:off", "torch:bf16:on"],
                   "cuda": ["tensorrt:fp16", "onnxruntime:fp16", "torch:fp16:off"]}


def model_only(model_dir: Path, tiles: np.ndarray, spec: RunnerSpec, args: argparse.Namespace) -> float:
    with open_models([model_dir], spec.backend, args.device, spec.precision, args.threads, spec.compile) as models:
        warm_up(models, args.batch)
        runner = models[0].backbone
        feeds = [(i, {"tiles": tiles[i:i + args.batch]}) for i in range(0, len(tiles), args.batch)]
        start = time.perf_counter()
        for _ in runner.infer_stream(feeds):
            pass
        return len(tiles) / (time.perf_counter() - start)


def end_to_end(model_dir: Path, slides: Path, out: Path, spec: RunnerSpec,
               args: argparse.Namespace) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "slidemil", "score", str(model_dir), str(slides), "--out", str(out),
           "--backend", spec.backend, "--device", args.device, "--precision", spec.precision,
           "--torch-compile", spec.compile, "--batch-size", str(args.batch), "--workers", str(args.workers)]
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


def report(results: dict[str, dict[str, list[float]]]) -> str:
    med = statistics.median
    baseline = results.get("torch fp32")
    base = med(baseline["end_to_end_tiles_per_s"]) if baseline else None
    lines = ["| runner | model-only tiles/s | end-to-end tiles/s | efficiency (e2e / model) | e2e vs torch fp32 eager "
             "| peak RSS MB |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, e, q = r["model_only_tiles_per_s"], r["end_to_end_tiles_per_s"], r["efficiency"]
        versus = f"{med(e) / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {med(m):.1f} ({min(m):.1f}-{max(m):.1f}) | {med(e):.1f} ({min(e):.1f}-{max(e):.1f}) "
                     f"| {med(q):.3f} ({min(q):.3f}-{max(q):.3f}) | {versus} | {med(r['peak_rss_mb']):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--runners", nargs="+", help="backend[:precision[:torch-compile]] ... (default: every CPU runner)")
    p.add_argument("--device", default="auto")
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
    args.device = resolve_device(args.device)
    specs = [RunnerSpec.parse(t) for t in args.runners or DEFAULT_RUNNERS["cuda" if args.device.startswith("cuda") else "cpu"]]
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-score-"))
    make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, seed=0), progress=False)
    ckpt = make_checkpoint(work / "run", args.backbone, "random", args.tile_px)
    export_checkpoint(ckpt, work / "model", ExportConfig(overwrite=True))
    if any(spec.precision == "int8" for spec in specs):  # calibrated on the cohort's slides, parity checked
        from slidemil.exporter.quantize import quantize_package
        quantize_package(work / "model", work / "cohort" / "slides")
    from slidemil.exporter.package import load_package
    tiling = load_package(work / "model").tiling
    tiles = real_tiles(next((work / "cohort" / "slides").glob("*.svs")), tiling, args.model_tiles)
    results = {str(s): {"model_only_tiles_per_s": [], "end_to_end_tiles_per_s": [], "efficiency": [], "peak_rss_mb": []}
               for s in specs}
    for run in range(args.runs):
        for spec in specs:
            r = results[str(spec)]
            model = model_only(work / "model", tiles, spec, args)
            out = work / f"score_{spec.backend}_{spec.precision}_{spec.compile}_{run}"
            rate, peak = end_to_end(work / "model", work / "cohort" / "slides", out, spec, args)
            for key, value in (("model_only_tiles_per_s", model), ("end_to_end_tiles_per_s", rate),
                               ("efficiency", rate / model), ("peak_rss_mb", peak)):
                r[key].append(value)
            print(f"run {run} {spec}: model-only {model:.1f} tiles/s, end-to-end {rate:.1f} tiles/s, "
                  f"peak RSS {peak:.0f} MB", flush=True)
    meta = {"backbone": args.backbone, "device": args.device, "batch": args.batch, "workers": args.workers,
            "slide_size": args.size, "n_slides": args.n_slides, "runs": args.runs}
    (work / "bench_score.json").write_text(json.dumps({**meta, "runners": results}, indent=2))
    print("\n" + report(results))
    print(f"results: {work / 'bench_score.json'}")


if __name__ == "__main__":
    main()
