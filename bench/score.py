"""Engine efficiency and runners side by side: end-to-end tiles/s of `slidemil score` and model-only tiles/s.

Run by hand from the repository root (package installed): ``python bench/score.py [--backbone
resnet50_trunc] [--runners openvino:int8 openvino:bf16 onnxruntime:fp32 torch:fp32:off torch:bf16:off torch:bf16:on]
[--device auto|cpu|cuda] [--size 8192] [--n-slides 2] [--batch 32] [--workers 2] [--runs 3]``.

A runner is ``backend[:precision[:torch-compile]]``: backend torch, onnxruntime, openvino or tensorrt;
precision auto, fp32, fp16, bf16 or int8 where the backend has it (onnxruntime: fp32, fp16; openvino:
fp32, bf16, int8; tensorrt: fp16, fp32); torch-compile on, off or auto (torch only; default off).
The default list is every runner of the device that can run here:

- cpu: openvino:int8 (with nncf: the package is then quantized on the cohort's slides), openvino:bf16,
  onnxruntime:fp32, torch:fp32:off, torch:bf16:off, torch:bf16:on;
- cuda: tensorrt:fp16 (where tensorrt imports), onnxruntime:fp16 (where onnxruntime-gpu gives the CUDA
  provider), torch:fp16:off, torch:bf16:off, torch:fp32:off.

The package is exported with what the runners need: fp16 ONNX graphs for ONNX Runtime fp16, TensorRT
engines (built on this GPU) for tensorrt, an int8 backbone for openvino:int8. A runner asked for by
``--runners`` that cannot run here stops the bench at once, saying why and what to install.

A synthetic cohort of 20x slides is written, a package is exported from a random-weights checkpoint of
the backbone with a gated head, then, ``--runs`` times, each runner in turn (interleaved, so that a
change in machine load hits them all alike):

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

from slidemil.engine.models import open_models, warm_up
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.runtime.runners import resolve_device
from slidemil.slide.readers import open_slide
from slidemil.slide.synth import SynthConfig, make_cohort
from slidemil.slide.tiling import TilingConfig, plan_tiles


def real_tiles(slide: Path, tiling: TilingConfig, n: int) -> np.ndarray:
    with open_slide(slide) as reader:
        plan = plan_tiles(reader, tiling)
        coords = plan.grid.coords[np.linspace(0, len(plan.grid) - 1, n).astype(int)]
        return reader.read_tiles(coords, plan.grid.patch_size_level0, tiling.tile.patch_size)


PRECISIONS = {"torch": ("auto", "fp32", "fp16", "bf16"), "onnxruntime": ("auto", "fp32", "fp16"),
              "openvino": ("auto", "fp32", "bf16", "int8"), "tensorrt": ("auto", "fp16", "fp32")}
COMPILE_MODES = ("off", "on", "auto")


@dataclass(frozen=True)
class RunnerSpec:
    backend: str
    precision: str = "auto"
    compile: str = "off"

    @classmethod
    def parse(cls, text: str) -> RunnerSpec:
        return parse_runner(text)

    def __str__(self) -> str:
        name = f"{self.backend} {self.precision}"
        if self.backend != "torch" or self.compile == "off":
            return name
        return name + (" compiled" if self.compile == "on" else " compile auto")

    @property
    def text(self) -> str:
        """The spec as written on the command line."""
        return f"{self.backend}:{self.precision}" + (f":{self.compile}" if self.backend == "torch" else "")


def parse_runner(text: str) -> RunnerSpec:
    """``backend[:precision[:torch-compile]]`` -> RunnerSpec; argparse.ArgumentTypeError saying what is allowed."""
    parts = text.split(":")
    backend = parts[0]
    if backend not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"runner {text!r}: unknown backend {backend!r}; use one of {list(PRECISIONS)}")
    if len(parts) > (3 if backend == "torch" else 2):
        raise argparse.ArgumentTypeError(f"runner {text!r}: write backend[:precision]"
                                         f"{'[:torch-compile]' if backend == 'torch' else ''}")
    spec = RunnerSpec(*parts)
    if spec.precision not in PRECISIONS[backend]:
        raise argparse.ArgumentTypeError(f"runner {text!r}: {backend} runs at {', '.join(PRECISIONS[backend])}, "
                                         f"not {spec.precision}")
    if spec.compile not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"runner {text!r}: torch-compile is on, off or auto, not {spec.compile!r}")
    return spec


@dataclass(frozen=True)
class Environment:
    """What this machine can run: a CUDA GPU for torch, ONNX Runtime's providers (None: not installed),
    OpenVINO and NNCF installed, and why TensorRT cannot run (None: it can)."""

    cuda: bool
    onnxruntime: tuple[str, ...] | None
    openvino: bool
    nncf: bool
    tensorrt: str | None


def detect_environment() -> Environment:
    import importlib.util

    import torch

    from slidemil.errors import BackendUnavailableError
    try:
        import onnxruntime
        providers: tuple[str, ...] | None = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = None
    try:
        from slidemil.runtime.tensorrt_runner import import_tensorrt
        import_tensorrt()
        tensorrt = None
    except BackendUnavailableError as exc:
        tensorrt = str(exc)
    return Environment(cuda=torch.cuda.is_available(), onnxruntime=providers,
                       openvino=importlib.util.find_spec("openvino") is not None,
                       nncf=importlib.util.find_spec("nncf") is not None, tensorrt=tensorrt)


def runner_problem(spec: RunnerSpec, device: str, env: Environment) -> str | None:
    """Why ``spec`` cannot run on ``device`` here (what to install or change), or None when it can."""
    cuda = device.startswith("cuda")
    if spec.backend == "torch" and cuda and not env.cuda:
        return ("torch sees no CUDA GPU here (torch.cuda.is_available() is False): run on a GPU machine with "
                "a CUDA build of torch, or use --device cpu")
    if spec.backend == "onnxruntime":
        if env.onnxruntime is None:
            return "onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for CUDA)"
        if cuda and "CUDAExecutionProvider" not in env.onnxruntime:
            return (f"ONNX Runtime has no CUDA provider here (it has {', '.join(env.onnxruntime)}): install "
                    "onnxruntime-gpu in place of onnxruntime (pip install 'slidemil[gpu]')")
    if spec.backend == "openvino":
        if cuda:
            return "slidemil runs OpenVINO on the CPU only: use --device cpu"
        if not env.openvino:
            return "OpenVINO is not installed: pip install openvino"
        if spec.precision == "int8" and not env.nncf:
            return "openvino:int8 quantizes the package with NNCF, which is not installed: pip install 'slidemil[quantize]'"
    if spec.backend == "tensorrt":
        if not cuda:
            return "TensorRT runs on CUDA GPUs only: use --device cuda"
        if env.tensorrt is not None:
            return env.tensorrt
    return None


DEFAULT_RUNNERS = {"cpu": ["openvino:int8", "openvino:bf16", "onnxruntime:fp32", "torch:fp32:off", "torch:bf16:off",
                           "torch:bf16:on"],
                   "cuda": ["tensorrt:fp16", "onnxruntime:fp16", "torch:fp16:off", "torch:bf16:off", "torch:fp32:off"]}


def default_runners(device: str, env: Environment) -> tuple[list[RunnerSpec], dict[str, str]]:
    """The device's default runners that can run here, and those left out with the reason."""
    specs, left_out = [], {}
    for text in DEFAULT_RUNNERS["cuda" if device.startswith("cuda") else "cpu"]:
        spec = parse_runner(text)
        problem = runner_problem(spec, device, env)
        if problem is None:
            specs.append(spec)
        else:
            left_out[text] = problem
    return specs, left_out


def choose_runners(requested: list[RunnerSpec] | None, device: str, env: Environment) -> list[RunnerSpec]:
    """The runners to time: those requested, each of which must be able to run here, or the defaults.

    Raises:
        SystemExit: a requested runner cannot run here, or no default runner can (the message says why).
    """
    if requested:
        problems = [f"{s.text}: {problem}" for s in requested
                    if (problem := runner_problem(s, device, env)) is not None]
        if problems:
            raise SystemExit(f"bench/score.py: these runners cannot run on {device} here:\n  " + "\n  ".join(problems))
        return list(requested)
    specs, left_out = default_runners(device, env)
    reasons = [f"{text}: {problem}" for text, problem in left_out.items()]
    if not specs:
        raise SystemExit(f"bench/score.py: no runner can run on {device} here:\n  " + "\n  ".join(reasons))
    for reason in reasons:
        logging.getLogger("bench").warning("leaving out %s", reason)
    return specs


def export_config(specs: list[RunnerSpec], device: str) -> ExportConfig:
    """What the package must hold for ``specs``: fp16 ONNX graphs for ONNX Runtime fp16 (``auto`` takes
    them on a GPU), TensorRT engines of each precision asked for (``auto``: fp16)."""
    cuda = device.startswith("cuda")
    fp16 = any(s.backend == "onnxruntime" and (s.precision == "fp16" or (s.precision == "auto" and cuda))
               for s in specs)
    trt = sorted({"fp16" if s.precision == "auto" else s.precision for s in specs if s.backend == "tensorrt"})
    return ExportConfig(overwrite=True, fp16=fp16, tensorrt=bool(trt), trt_precisions=tuple(trt) or ("fp16",))


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--runners", nargs="+", type=parse_runner, metavar="RUNNER",
                   help="backend[:precision[:torch-compile]] ... (default: every runner of the device that can run "
                        "here; see the module docstring)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--model-tiles", type=int, default=256, help="tiles timed per model-only run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path)
    return p


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.device = resolve_device(args.device)
    specs = choose_runners(args.runners, args.device, detect_environment())  # before any work: fail fast
    print("runners: " + ", ".join(map(str, specs)), flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export import make_checkpoint  # bench/export.py: a checkpoint in the trainer's format

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-score-"))
    make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, seed=0), progress=False)
    ckpt = make_checkpoint(work / "run", args.backbone, "random", args.tile_px)
    export_checkpoint(ckpt, work / "model", export_config(specs, args.device))
    if any(spec.precision == "int8" for spec in specs):  # calibrated on the cohort's slides, parity checked
        from slidemil.exporter.quantize import quantize_package
        quantize_package(work / "model", work / "cohort" / "slides")
    from slidemil.artifacts.package import load_package
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
