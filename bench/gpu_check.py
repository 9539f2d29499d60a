"""The device check of the GPU path: one run, one JSON (``bench/gpu_check.sh`` installs, then runs this).

Run from the repository root: ``python bench/gpu_check.py --out DIR [--work DIR] [--dry-run] [--budget-s 420]``.
Every step is timed and guarded: a step that fails records its error and the next one runs; the JSON
(``DIR/gpu_check.json``) is rewritten after each step, so a run cut short keeps what it measured.

Steps (``--dry-run``: the same steps on the CPU, with tiny models and sizes, in a couple of minutes):

1. ``cohort``: synthetic 20x slides, a few distinct ones written in parallel, hard-linked to a cohort;
3. ``decode``: batched nvJPEG (``decode_jpeg(list, device="cuda")``) tiles/s on the cohort's JPEG tiles,
   libjpeg on one CPU thread for comparison, and the tile pipeline alone (no model) decoding on the device
   and on the CPU;
4. ``resnet50_trunc`` (256 px): model-only tiles/s (the planned runner on tiles already on the device) and
   end to end (``slidemil score`` in a fresh process, tiles/s after start-up), efficiency, GPU busy time and
   idle gaps from the runner's CUDA events (``SLIDEMIL_GPU_TRACE``), nvidia-smi utilisation samples, peak GPU
   and host memory; then the same end to end with ``--decode cpu`` where time allows;
5. ``vit_large`` (224 px, ``vit_large_patch16_224``, random weights): model-only, and end to end through
   ``slidemil extract`` (the same pipeline and runner; no package export of a 1.2 GB ViT);
6. ``ddp``: ``torchrun --nproc_per_node 1 bench/ddp_smoke.py`` (nccl on CUDA, gloo on the CPU);
7. ``train_end2end``: ``bench/train_end2end.py --amp`` (resnet50 at 224 px, bf16 autocast): patches/s;
8. ``pytest_gpu``: ``pytest -m gpu`` on the test files that have gpu tests (they skip without CUDA), last,
   with ``--pytest-reserve-s`` of the budget kept for it (the measurements run on an idle GPU);
9. ``targets``: the issue's targets, judged on a GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GPU_TEST_FILES = ["tests/test_gpu_runtime.py", "tests/test_device_pipeline.py", "tests/test_multi_device.py",
                  "tests/test_jpeg_source.py", "tests/test_tensorrt.py", "tests/test_trainer_end2end.py"]


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the GPU run's sizes, or the dry run's."""

    device: str
    slide_px: int  # level-0 width of each distinct synthetic slide
    distinct: int  # distinct slides, written in parallel
    slides: int  # slides in the cohort (hard links to the distinct ones)
    vit_slides: int  # of them, scored by the ViT
    resnet: str
    vit: str
    model_tiles: int  # tiles per model-only run
    decode_tiles: int  # JPEG tiles decoded by the decode step
    workers: int  # reader threads
    limit_tiles: int | None  # per slide, in the ViT's end to end (dry run)
    train: tuple[str, ...]  # arguments of bench/train_end2end.py
    feature_slides: int  # of the DDP smoke's features cohort


GPU = Sizes("cuda", 24576, 3, 12, 2, "resnet50_trunc", "vit_large_patch16_224", 20480, 4096, 12, None,
            ("--backbone", "resnet50", "--tile-px", "224", "--mpp", "0.5", "--max-patches", "256", "--eval-patches",
             "256", "--n-slides", "8", "--size", "8192", "--epochs", "2", "--amp", "--amp-dtype", "bfloat16",
             "--workers", "8", "--device", "cuda"), 16)
DRY = Sizes("cpu", 4096, 2, 3, 1, "test_resnet", "test_vit", 64, 256, 2, 48,
            ("--backbone", "test_resnet", "--tile-px", "64", "--mpp", "1.0", "--max-patches", "16", "--eval-patches",
             "16", "--n-slides", "6", "--size", "1536", "--epochs", "1", "--amp", "--amp-dtype", "bfloat16",
             "--workers", "0", "--device", "cpu", "--threads", "2"), 12)


class Check:
    """The report, its steps and the time budget."""

    def __init__(self, out: Path, work: Path, sizes: Sizes, dry_run: bool, budget_s: float,
                 reserve_s: float = 0.0) -> None:
        self.out, self.sizes, self.dry_run = out, sizes, dry_run
        self.deadline = time.monotonic() + budget_s
        self.reserve_s = reserve_s  # kept for the last step (pytest)
        self.work = work  # slides, packages, features: large, kept out of ``out``
        self.work.mkdir(parents=True, exist_ok=True)
        self.report: dict[str, Any] = {"mode": "dry-run (CPU)" if dry_run else "gpu", "sizes": asdict(sizes),
                                       "environment": environment(), "steps": {}}
        self.path = out / "gpu_check.json"
        self.save()

    def left(self) -> float:
        """Seconds left for the measurements (the reserve for the last step taken off)."""
        return self.deadline - time.monotonic() - self.reserve_s

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(finite(self.report), indent=2, default=str, allow_nan=False))
        tmp.replace(self.path)

    def step(self, name: str, fn: Callable[[], dict[str, Any]], needs_s: float = 0.0) -> dict[str, Any] | None:
        """Run one step unless less than ``needs_s`` seconds are left; record its figures or its error."""
        record: dict[str, Any]
        if self.left() < needs_s:
            record = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left, needs about {needs_s:.0f}"}
            print(f"[gpu_check] {name}: skipped ({record['reason']})", flush=True)
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            start = time.perf_counter()
            try:
                record = {"status": "ok", **fn()}
            except Exception as exc:  # the next step runs; the report says what failed
                record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            record["seconds"] = round(time.perf_counter() - start, 1)
            print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.report["steps"][name] = record
        self.save()
        return record if record["status"] == "ok" else None


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# -- environment -------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    import torch
    import torchvision
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                           "cpus": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
        env["driver"] = _smi(["--query-gpu=driver_version", "--format=csv,noheader"])
    try:
        with open("/proc/meminfo") as f:
            env["host_memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return env


def _smi(query: list[str]) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# -- steps -------------------------------------------------------------------------------------------

def run_pytest(check: Check) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--continue-on-collection-errors", *GPU_TEST_FILES]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(60, check.left()))
    (check.out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"exit_code": proc.returncode, "summary": summary, "failed": failed, "log": "pytest_gpu.log"}


def _write_slide(args: tuple[str, int, int]) -> str:
    from slidemil.slide.synth import write_slide
    path, size, seed = args
    if Path(path).is_file():  # a re-run in the same work folder: the same seed wrote the same slide
        return path
    write_slide(Path(path), size=size, label=seed % 2, n_classes=2, lesion_fraction=0.03,
                rng=np.random.default_rng(seed))
    return path


def make_cohort(check: Check) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    from slidemil.processes import worker_context
    from slidemil.slide.readers import open_slide
    from slidemil.slide.tiling import TilingConfig, plan_tiles
    s = check.sizes
    distinct_dir, slides = check.work / "distinct", check.work / "slides"
    vit_slides = check.work / "slides_vit"
    for d in (distinct_dir, slides, vit_slides):
        d.mkdir(exist_ok=True)
    jobs = [(str(distinct_dir / f"d{i}.svs"), s.slide_px, i) for i in range(s.distinct)]
    with ProcessPoolExecutor(max_workers=s.distinct, mp_context=worker_context()) as pool:
        paths = list(pool.map(_write_slide, jobs))
    tiles = {}
    for path in paths:
        with open_slide(path) as reader:
            tiles[path] = {px: len(plan_tiles(reader, TilingConfig(tile=_spec(px))).grid) for px in (256, 224)}
    n256 = n224 = 0
    for k in range(s.slides):
        src = paths[k % len(paths)]
        for folder, count in ((slides, s.slides), (vit_slides, s.vit_slides)):
            if k < count and not (folder / f"s{k:02d}.svs").exists():
                os.link(src, folder / f"s{k:02d}.svs")
        n256 += tiles[src][256]
        n224 += tiles[src][224] if k < s.vit_slides else 0
    return {"slides": s.slides, "distinct": s.distinct, "slide_px": s.slide_px, "tiles_256": n256,
            "vit_slides": s.vit_slides, "tiles_224": n224, "mb_per_slide": round(Path(paths[0]).stat().st_size / 1e6, 1)}


def _spec(px: int) -> Any:
    from slidemil.slide.grid import TileSpec
    return TileSpec(patch_size=px, mpp=0.5)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def decode(check: Check) -> dict[str, Any]:
    import torch

    from slidemil.runtime.pipeline import PipelineConfig, TilePipeline
    from slidemil.slide.jpeg_device import decode_streams
    from slidemil.slide.jpeg_source import JpegTileSource
    from slidemil.slide.readers import open_slide
    from slidemil.slide.table import load_slides
    from slidemil.slide.tiling import TilingConfig, plan_tiles
    s = check.sizes
    slide = next((check.work / "distinct").glob("*.svs"))
    with open_slide(slide) as reader:
        grid = plan_tiles(reader, TilingConfig(tile=_spec(256))).grid
    streams: list[torch.Tensor] = []
    with JpegTileSource(slide) as src:
        for start in range(0, len(grid.coords), 256):
            encoded = src.fetch(grid.coords[start:start + 256], grid.patch_size_level0, 256)
            if encoded is not None:
                streams.extend(encoded.streams)
            if len(streams) >= s.decode_tiles:
                break
    streams = (streams * (s.decode_tiles // max(1, len(streams)) + 1))[:s.decode_tiles]
    device = torch.device(s.device)
    batch = 256
    decode_streams(streams[:batch], device)  # nvJPEG's start-up
    _sync(s.device)
    start = time.perf_counter()
    for first in range(0, len(streams), batch):
        decode_streams(streams[first:first + batch], device)
    _sync(s.device)
    device_rate = len(streams) / (time.perf_counter() - start)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    decode_streams(streams[:batch], cpu)
    cpu_rate = batch / (time.perf_counter() - start)
    out: dict[str, Any] = {"tile_px": 256, "tiles": len(streams), "batch": batch,
                           "kb_per_tile": round(sum(t.numel() for t in streams[:batch]) / batch / 1e3, 1),
                           "device": s.device, "decode_tiles_per_s": round(device_rate, 1),
                           "cpu_one_thread_tiles_per_s": round(cpu_rate, 1)}
    entries = load_slides(check.work / "slides")[: max(2, s.slides // 3)]
    for name, decode_device in (("pipeline_device_decode", s.device), ("pipeline_cpu_decode", None)):
        cfg = PipelineConfig(batch_size=256, workers=s.workers)
        start, n = time.perf_counter(), 0
        with TilePipeline(cfg, TilingConfig(tile=_spec(256)), decode_device=decode_device) as pipeline:
            for stream in pipeline.run(entries):
                for _, tiles in stream.batches():
                    if not isinstance(tiles, torch.Tensor):
                        tiles = torch.from_numpy(tiles).to(device)
                    n += len(tiles)
        _sync(s.device)
        out[name] = {"tiles_per_s": round(n / (time.perf_counter() - start), 1), "tiles": n, "slides": len(entries),
                     "reader_threads": s.workers, "note": "tiles on the device per second, no model (planning included)"}
    return out


def _host_tiles(slide: Path, px: int, n: int) -> np.ndarray:
    from slidemil.slide.readers import open_slide
    from slidemil.slide.tiling import TilingConfig, plan_tiles
    with open_slide(slide) as reader:
        grid = plan_tiles(reader, TilingConfig(tile=_spec(px))).grid
        coords = grid.coords[np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)]
        return reader.read_tiles(coords, grid.patch_size_level0, px)


def time_runner(runner: Any, tiles: np.ndarray, batch: int, total: int, device: str) -> float:
    """Model-only tiles/s: the runner streamed over ``total`` tiles already on its device, at ``batch``."""
    import torch
    held = torch.from_numpy(tiles).to(device) if device.startswith("cuda") else tiles
    reps = -(-batch // len(held))
    pool = torch.cat([held] * reps) if device.startswith("cuda") else np.concatenate([held] * reps)
    feeds = [(i, {"tiles": pool[:batch]}) for i in range(0, total, batch)]
    for _ in runner.infer_stream(feeds[:2]):  # warm: graphs, cuDNN's choices, allocations
        pass
    _sync(device)
    start = time.perf_counter()
    for _ in runner.infer_stream(feeds):
        pass
    _sync(device)
    return len(feeds) * batch / (time.perf_counter() - start)


class SmiSampler:
    """nvidia-smi utilisation and memory every 100 ms, in a thread, while a command runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SmiSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                           "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), util, mem))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def window(self, start: float, end: float) -> dict[str, Any] | None:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return None
        util = [u for u, _ in inside]
        return {"samples": len(util), "mean_utilization_pct": round(statistics.mean(util), 1),
                "p10_utilization_pct": round(float(np.percentile(util, 10)), 1),
                "share_below_50pct": round(sum(u < 50 for u in util) / len(util), 3),
                "max_memory_used_mib": max(m for _, m in inside)}


def analyse_trace(path: Path) -> dict[str, Any] | None:
    """GPU busy time and idle gaps of the backbone runner's batches (CUDA events; the warm-up batch left out)."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["inputs"] == ["tiles"] and len(r["batches"]) > 2]
    if not records:
        return None
    batches = sorted(records[0]["batches"])[1:]  # the first is warm_up's blank batch (graph capture)
    full = max(n for _, _, n in batches)
    durations = [e - s for s, e, _ in batches]
    gaps = [max(0.0, batches[i + 1][0] - batches[i][1]) for i in range(len(batches) - 1)]
    after_partial = [gaps[i] for i in range(len(gaps)) if batches[i][2] < full]  # a slide's last batch
    batch_ms = statistics.median(d for d, (_, _, n) in zip(durations, batches) if n == full)
    span = batches[-1][1] - batches[0][0]
    return {"batches": len(batches), "batch_size": full, "median_batch_ms": round(batch_ms, 3),
            "gpu_busy_fraction": round(sum(durations) / span, 4) if span > 0 else None,
            "max_gap_ms": round(max(gaps, default=0.0), 3),
            "gaps_longer_than_a_batch": sum(g > batch_ms for g in gaps),
            "max_gap_between_slides_ms": round(max(after_partial, default=0.0), 3),
            "slide_boundaries": len(after_partial),
            "peak_gpu_mb": records[0].get("peak_gpu_mb"), "runner": records[0].get("runner")}


def run_engine(check: Check, cmd: list[str], name: str) -> tuple[dict[str, Any], float, float, SmiSampler]:
    """Run ``python -m slidemil ...`` with the GPU trace on; returns its trace analysis and wall window."""
    trace = check.out / f"{name}.trace.jsonl"
    trace.unlink(missing_ok=True)
    env = {**os.environ, "SLIDEMIL_GPU_TRACE": str(trace)}
    log_path = check.out / f"{name}.log"
    with SmiSampler() as smi, open(log_path, "w") as log_file:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "slidemil", *cmd], cwd=REPO, env=env, stdout=log_file,
                              stderr=subprocess.STDOUT, timeout=max(60, check.left()))
        ended = time.monotonic()
    if proc.returncode:
        raise RuntimeError(f"slidemil {cmd[0]} exited {proc.returncode}; see {log_path}")
    return {"trace": analyse_trace(trace), "log": log_path.name}, started, ended, smi


def resnet(check: Check) -> dict[str, Any]:
    import torch

    from slidemil.engine.models import open_models, warm_up
    from slidemil.exporter.export import ExportConfig, export_checkpoint
    from slidemil.exporter.parity import ParityConfig
    sys.path.insert(0, str(REPO / "bench"))
    from export import make_checkpoint  # bench/export.py: a features-mode checkpoint with a gated head
    s = check.sizes
    model = check.work / "resnet_model"
    ckpt = make_checkpoint(check.work / "resnet_run", s.resnet, "random", 256)
    quick = ParityConfig(n_tiles=16, batch_sizes=(1, 8, 16), bag_sizes=(1, 500), n_slide_bags=4)
    start = time.perf_counter()
    export_checkpoint(ckpt, model, ExportConfig(exporter="legacy", overwrite=True, parity=quick))
    out: dict[str, Any] = {"backbone": s.resnet, "tile_px": 256, "export_seconds": round(time.perf_counter() - start, 1)}
    tiles = _host_tiles(next((check.work / "distinct").glob("*.svs")), 256, 512)
    with open_models([model], "torch", s.device, "auto", torch_compile="auto") as models:
        plan = models[0].plan
        warm_up(models, plan.batch_size)
        out["plan"] = plan.describe()
        out["batch_size"] = plan.batch_size
        out["model_only_tiles_per_s"] = round(time_runner(models[0].backbone, tiles, plan.batch_size,
                                                          max(s.model_tiles, 2 * plan.batch_size), s.device), 1)
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    decode = ["--decode", "device"] if check.dry_run else []  # the device stages on the CPU in the dry run
    for label, extra in (("end_to_end", decode), ("end_to_end_cpu_decode", ["--decode", "cpu"])):
        if label != "end_to_end" and (check.dry_run or check.left() < 90):
            out[label] = {"status": "skipped", "reason": "dry run" if check.dry_run else "time budget"}
            continue
        score_out = check.work / f"score_{label}"
        shutil.rmtree(score_out, ignore_errors=True)
        result, started, ended, smi = run_engine(
            check, ["score", str(model), str(check.work / "slides"), "--out", str(score_out), "--backend", "torch",
                    "--device", s.device, "--workers", str(s.workers), *extra], f"resnet_{label}")
        summary = json.loads((score_out / "run_summary.json").read_text())
        rate = summary["tiles_per_s_after_load"]
        scoring = summary["wall_seconds"] - summary["model_load_seconds"]
        result.update({"tiles": summary["total_tiles"], "slides": summary["slides"], "tiles_per_s": rate,
                       "tiles_per_s_wall": summary["tiles_per_s"], "load_seconds": summary["model_load_seconds"],
                       "plan": summary.get("plan"), "peak_gpu_mb": summary.get("peak_gpu_mb"),
                       "peak_rss_mb": summary.get("peak_rss_mb"),
                       "efficiency": round(rate / out["model_only_tiles_per_s"], 3),
                       "nvidia_smi": smi.window(ended - scoring, ended)})
        out[label] = result
    return out


def vit(check: Check) -> dict[str, Any]:
    from slidemil.models.backbones import create_backbone
    from slidemil.models.preprocess import UInt8Backbone
    from slidemil.runtime.plan import backbone_files, build_backbone_runner, plan_execution
    s = check.sizes
    import torch
    torch.manual_seed(0)
    module, card = create_backbone(s.vit, "random")
    files = backbone_files(UInt8Backbone(module, card).eval(), card, check.work / "vit_backbone", 224)
    plan = plan_execution(files, "torch", s.device, torch_compile="auto")
    out: dict[str, Any] = {"backbone": s.vit, "tile_px": 224, "plan": plan.describe(), "batch_size": plan.batch_size}
    tiles = _host_tiles(next((check.work / "distinct").glob("*.svs")), 224, 512)
    with build_backbone_runner(files, plan) as runner:
        runner.infer({"tiles": tiles[:plan.batch_size]})
        out["model_only_tiles_per_s"] = round(time_runner(runner, tiles, plan.batch_size,
                                                          max(s.model_tiles // 5, 2 * plan.batch_size), s.device), 1)
    del module, files
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    extract_out = check.work / "vit_features"
    shutil.rmtree(extract_out, ignore_errors=True)
    cmd = ["extract", str(check.work / "slides_vit"), "--tile", "--patch-size", "224", "--mpp", "0.5", "--out",
           str(extract_out), "--backbone", s.vit, "--weights", "random", "--backend", "torch", "--device", s.device,
           "--workers", str(s.workers)]
    if check.dry_run:
        cmd += ["--decode", "device", "--limit-tiles", str(s.limit_tiles)]
    result, started, ended, smi = run_engine(check, cmd, "vit_end_to_end")
    import pandas as pd
    table = pd.read_csv(extract_out / "extraction.csv")
    tiles_done, seconds = int(table["n_tiles"].sum()), float(table["seconds"].sum())
    rate = tiles_done / seconds
    result.update({"tiles": tiles_done, "tiles_per_s": round(rate, 1),
                   "note": "slidemil extract: tiles over the slides' own seconds (reading, backbone, h5 writing)",
                   "efficiency": round(rate / out["model_only_tiles_per_s"], 3),
                   "nvidia_smi": smi.window(ended - seconds, ended)})
    out["end_to_end"] = result
    return out


def ddp(check: Check) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.trainer_fixtures import make_feature_cohort
    feats = make_feature_cohort(check.work / "ddp_features", n_slides=check.sizes.feature_slides)
    result = check.out / "ddp.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "bench" / "ddp_smoke.py"), "--features", str(feats), "--out", str(check.work / "ddp_run"),
           "--json", str(result), "--device", check.sizes.device]
    log_path = check.out / "ddp.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=max(60, check.left()))
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}; see {log_path}")
    return {"command": "torchrun --nproc_per_node 1 bench/ddp_smoke.py", **json.loads(result.read_text())}


def train_end2end(check: Check) -> dict[str, Any]:
    result = check.out / "train_end2end.json"
    log_path = check.out / "train_end2end.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_end2end.py"), *check.sizes.train,
                               "--out", str(check.work / "train_end2end"), "--json", str(result)], cwd=REPO,
                              stdout=log_file, stderr=subprocess.STDOUT, timeout=max(60, check.left()))
    if proc.returncode:
        raise RuntimeError(f"bench/train_end2end.py exited {proc.returncode}; see {log_path}")
    return json.loads(result.read_text())


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (resnet50_trunc 256 px: >= 10,000 tiles/s end to end at efficiency >= 0.9; ViT-L:
    end to end >= 90% of model-only; no GPU idle gap between slides longer than one batch)."""
    steps = report["steps"]
    res, vl = steps.get("resnet50_trunc") or {}, steps.get("vit_large") or {}
    e2e = res.get("end_to_end") or {}
    trace = e2e.get("trace") or {}
    vit_e2e = vl.get("end_to_end") or {}

    def judged(value: Any, ok: Callable[[Any], bool]) -> dict[str, Any]:
        return {"value": value, "met": None if value is None else bool(ok(value))}

    return {
        "resnet50_trunc end-to-end tiles/s >= 10000": judged(e2e.get("tiles_per_s"), lambda v: v >= 10_000),
        "resnet50_trunc efficiency >= 0.9": judged(e2e.get("efficiency"), lambda v: v >= 0.9),
        "vit_large end-to-end / model-only >= 0.9": judged(vit_e2e.get("efficiency"), lambda v: v >= 0.9),
        "max GPU idle gap between slides <= one batch (ms)": judged(
            [trace.get("max_gap_between_slides_ms"), trace.get("median_batch_ms")] if trace else None,
            lambda v: v[0] is not None and v[1] is not None and v[0] <= v[1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON, logs and GPU traces (small)")
    p.add_argument("--work", type=Path, help="slides, packages and features (large; default OUT/work)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for all steps: a step that would not fit is skipped, and said so")
    p.add_argument("--pytest-reserve-s", type=float, default=170.0, help="of the budget, kept for pytest -m gpu")
    p.add_argument("--skip-pytest", action="store_true")
    args = p.parse_args()
    import torch
    dry = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry:
        print("[gpu_check] torch sees no CUDA GPU: running the dry run (CPU)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.work or args.out / "work", DRY if dry else GPU, dry, args.budget_s,
                  0.0 if args.skip_pytest else args.pytest_reserve_s)
    cohort = check.step("cohort", lambda: make_cohort(check))
    if cohort is not None:
        check.step("decode", lambda: decode(check), needs_s=30)
        check.step("resnet50_trunc", lambda: resnet(check), needs_s=60)
        check.step("vit_large", lambda: vit(check), needs_s=60)
    check.step("ddp", lambda: ddp(check), needs_s=30)
    check.step("train_end2end", lambda: train_end2end(check), needs_s=45)
    if not args.skip_pytest:
        check.reserve_s = 0.0  # the last step: what is left, the reserve included
        check.step("pytest_gpu", lambda: run_pytest(check), needs_s=60)
    check.report["targets"] = targets(check.report) if not dry else "not judged in a dry run (CPU)"
    check.report["total_seconds"] = round(args.budget_s - (check.deadline - time.monotonic()), 1)
    check.save()
    print(json.dumps(finite(check.report), indent=2, default=str))


if __name__ == "__main__":
    main()
