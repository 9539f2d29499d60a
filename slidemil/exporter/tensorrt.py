"""TensorRT engines from the package's ONNX graphs (``slidemil build-engine``, ``slidemil export --tensorrt``).

Each engine is built with the TensorRT Python API: the ONNX parser, one optimisation profile
(backbone: batch min/opt/max; head: bag size min/opt/max), a workspace limit, and a timing cache
file reused across builds. fp16 uses ``BuilderFlag.FP16`` on TensorRT 10; on TensorRT 11, which has
no precision flags, a strongly typed network is built from the fp16 ONNX graph instead. The GPU
name, compute capability and TensorRT version go into the manifest, with the parity of every
engine against ONNX Runtime fp32. TensorRT is imported inside these functions only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.artifacts.package import (
    Package,
    engine_file,
    graph_file,
    load_package,
    write_manifest,
)
from slidemil.atomic import TMP_MARK, atomic_path, write_bytes
from slidemil.errors import ConfigError, ExportError
from slidemil.exporter.parity import (
    ParityConfig,
    fit_profiles,
    measure_parity,
    parity_tiles,
    summary,
    tolerance_for,
)
from slidemil.runtime.plan import ExecutionPlan, ModelFiles, build_runners
from slidemil.runtime.tensorrt_runner import device_info, import_tensorrt

log = logging.getLogger(__name__)

KINDS = ("backbone", "head")
INPUT_NAMES = {"backbone": "tiles", "head": "features"}


@dataclass(frozen=True)
class TensorRTConfig:
    """Settings of an engine build.

    Attributes:
        precisions: engines to build, ``fp16`` and/or ``fp32``.
        max_batch: largest backbone batch (profile max); ``opt_batch`` the one tuned for (default: max).
        max_bag: largest bag the head engine takes (tiles of one slide); ``opt_bag`` the one tuned for.
        workspace_gb: builder workspace limit.
        timing_cache: timing cache file; default ``~/.cache/slidemil/tensorrt/timing-<trt>-sm<cc>.cache``.
    """

    precisions: tuple[str, ...] = ("fp16",)
    max_batch: int = 256
    opt_batch: int | None = None
    max_bag: int = 100_000
    opt_bag: int = 8192
    workspace_gb: float = 4.0
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if not self.precisions or set(self.precisions) - {"fp16", "fp32"}:
            raise ConfigError(f"TensorRT precisions {self.precisions}: use fp16 and/or fp32")
        if not 1 <= (self.opt_batch or self.max_batch) <= self.max_batch or not 1 <= self.opt_bag:
            raise ConfigError("TensorRT profiles need 1 <= opt_batch <= max_batch and opt_bag >= 1")
        if self.workspace_gb <= 0:
            raise ConfigError(f"workspace_gb must be > 0, got {self.workspace_gb}")


def optimisation_profiles(tile_px: int, feature_dim: int, cfg: TensorRTConfig) -> dict[str, Any]:
    """Plain-data profiles: ``{kind: {input: {"min": shape, "opt": shape, "max": shape}}}``."""
    batch = {"min": 1, "opt": cfg.opt_batch or cfg.max_batch, "max": cfg.max_batch}
    bag = {"min": 1, "opt": min(cfg.opt_bag, cfg.max_bag), "max": cfg.max_bag}
    return {"backbone": {"tiles": {k: [v, tile_px, tile_px, 3] for k, v in batch.items()}},
            "head": {"features": {k: [v, feature_dim] for k, v in bag.items()}}}


def timing_cache_path(cfg: TensorRTConfig, info: dict[str, str]) -> Path:
    if cfg.timing_cache:
        return Path(cfg.timing_cache)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sm = info["compute_capability"].replace(".", "")
    return base / "slidemil" / "tensorrt" / f"timing-{info['version']}-sm{sm}.cache"


def build_engine(onnx_path: Path, plan_path: Path, profile: dict[str, dict[str, list[int]]], precision: str,
                 workspace_gb: float, cache_path: Path) -> Path:
    """Build one engine from ``onnx_path`` into ``plan_path`` (atomically), updating the timing cache."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16")  # TensorRT >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build {plan_path.name} from {onnx_path.name} (see its log above); "
                          "try a larger --workspace-gb or a smaller --max-batch")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return plan_path


def _source_graph(root: Path, kind: str, precision: str) -> Path:
    """fp32 graph, or on TensorRT >= 11 (strong typing) the fp16 graph, converted here if absent."""
    trt = import_tensorrt()
    if precision != "fp16" or hasattr(trt.BuilderFlag, "FP16"):
        return root / graph_file(kind)
    half = root / graph_file(kind, "fp16")
    if half.is_file():
        return half
    from slidemil.exporter.fp16 import convert_to_fp16
    return convert_to_fp16(root / graph_file(kind), root / f"{TMP_MARK}{half.name}")


def build_engines(root: str | Path, tile_px: int, feature_dim: int, cfg: TensorRTConfig, tiles: np.ndarray,
                  parity: ParityConfig) -> dict[str, Any]:
    """Build the engines of every precision in ``root`` and measure them against ONNX Runtime fp32.

    Returns:
        The manifest's ``tensorrt`` section (engines, profiles, GPU, versions, parity figures).

    Raises:
        BackendUnavailableError: no TensorRT or no GPU.
        ExportError: a build failed, or an engine misses its parity tolerance.
    """
    root = Path(root)
    info = device_info()
    profiles = optimisation_profiles(tile_px, feature_dim, cfg)
    cache = timing_cache_path(cfg, info)
    started = time.perf_counter()
    engines: dict[str, dict[str, str]] = {}
    for precision in cfg.precisions:
        engines[precision] = {}
        for kind in KINDS:
            source = _source_graph(root, kind, precision)
            build_engine(source, root / engine_file(kind, precision), profiles[kind], precision, cfg.workspace_gb, cache)
            if source.name.startswith(TMP_MARK):
                source.unlink()
            engines[precision][kind] = engine_file(kind, precision)
            log.info("built %s (%s, %s)", engines[precision][kind], info["gpu_name"], precision)
    seconds = round(time.perf_counter() - started, 1)
    section = {**info, "precision": list(engines), "engines": engines, "profiles": profiles,
               "workspace_gb": cfg.workspace_gb, "timing_cache": str(cache), "build_seconds": seconds}
    section["parity"] = engine_parity(root, engines, tiles, fit_profiles(parity, cfg.max_batch, section))
    return section


def engine_parity(root: Path, engines: dict[str, dict[str, str]], tiles: np.ndarray,
                  cfg: ParityConfig) -> dict[str, Any]:
    """Each precision's backbone engine, run as the engine scores (the head on ONNX Runtime fp32), against ONNX
    Runtime fp32 (CUDA where installed, else CPU)."""
    from slidemil.runtime.runners import OnnxRuntimeRunner
    device = "cuda" if OnnxRuntimeRunner.available("cuda") else "cpu"
    files = ModelFiles(root.name, int(tiles.shape[1]), 0, {k: {"fp32": root / graph_file(k)} for k in KINDS},
                       {p: {k: root / rel for k, rel in by_kind.items()} for p, by_kind in engines.items()})
    figures = {}
    with build_runners(files, ExecutionPlan("onnxruntime", device, "fp32")) as ref:
        for precision in engines:
            with build_runners(files, ExecutionPlan("tensorrt", "cuda", precision)) as cand:
                result = measure_parity(ref, cand, tiles, cfg, tolerance_for(precision))
            log.info("parity tensorrt %s vs onnxruntime fp32 (%s): %s", precision, device, summary(result))
            if not result["passed"]:
                raise ExportError(f"TensorRT {precision} engines miss their tolerance: {summary(result)}; "
                                  "build fp32 engines (--fp32) for this model")
            figures[precision] = {"reference": f"onnxruntime fp32 ({device})", **result}
    return figures


def build_package_engines(package_dir: str | Path, cfg: TensorRTConfig, parity: ParityConfig | None = None) -> Package:
    """``slidemil build-engine``: add TensorRT engines for this GPU to an existing package.

    Engines of an earlier build (another GPU or TensorRT version) are replaced; the manifest is
    rewritten last, with the new files' checksums.
    """
    import_tensorrt()
    parity = parity or ParityConfig()
    pkg = load_package(package_dir)
    tiles, source = parity_tiles(pkg.tiling, pkg.tile_px, parity.n_tiles, parity.slide, parity.seed)
    section = build_engines(pkg.root, pkg.tile_px, pkg.card.feature_dim, cfg, tiles, parity)
    section["parity_tiles"] = source
    keep = {f for files in section["engines"].values() for f in files.values()}
    for stale in pkg.root.glob("*.plan"):
        if stale.name not in keep:
            stale.unlink()
    versions = {**pkg.manifest.library_versions, "tensorrt": section["version"]}
    write_manifest(pkg.root, dataclasses.replace(pkg.manifest, tensorrt=section, library_versions=versions))
    return load_package(pkg.root)
