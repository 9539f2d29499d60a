"""The one place that decides where and how a model runs: backend, device, precision, compilation.

``plan_execution`` resolves every ``auto`` once, from what the model offers (:class:`ModelFiles`: the
graphs, engines, int8 IR and torch weights of a package, or a bare backbone for feature extraction)
and what this machine has: backend, precision, compilation and CUDA graphs, the batch size (on a GPU
from its free memory and the model's memory per tile) and whether tiles are decoded on the device
(``decode_on_device``: the tile pipeline then decodes JPEG tiles where the model runs, and the
runner takes them there); ``build_runners`` then builds the runners of that plan. ``score``,
``extract``, ``verify``, ``quantize`` and the benchmarks all go through these two, so a parity check
measures exactly the combination that scoring runs: the backbone on the planned backend, and the
head on ONNX Runtime fp32 on the CPU (exact, and the accelerator moves on to the next slide), or in
torch when the backend is torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from slidemil.choices import Backend, CompileMode, DecodeMode, Precision
from slidemil.errors import ConfigError, PackageError
from slidemil.models.onnx import HEAD_OUTPUTS
from slidemil.runtime.runners import (
    OnnxRuntimeRunner,
    Runner,
    TensorMeta,
    TorchRunner,
    choose_backend,
    has_cxx_compiler,
    resolve_device,
)

log = logging.getLogger(__name__)

GraphPath = Path | Callable[[], Path]  # a file, or a function writing it on first use


class ModelFiles:
    """What a model offers the backends: ONNX graphs, TensorRT engines, an int8 IR, torch modules.

    Args:
        name: shown in logs.
        tile_px: edge of the uint8 tiles the backbone takes.
        feature_dim: width of the backbone's features (the head's input).
        graphs: ``{"backbone": {precision: path}, "head": {...}}``; a path may be a function that writes
            the graph on first use (feature extraction exports only when a backend needs it).
        engines: ``{precision: {"backbone": plan, "head": plan}}`` (TensorRT).
        int8_backbone: OpenVINO IR of the quantized backbone.
        torch_models: returns ``(uint8 backbone module, head module or None)`` (loaded on first use).
        engine_check: raises when the engines were built for another GPU or TensorRT version.
        head: whether the model has a head (a bare backbone for feature extraction has none).
    """

    def __init__(self, name: str, tile_px: int, feature_dim: int, graphs: Mapping[str, Mapping[str, GraphPath]],
                 engines: Mapping[str, Mapping[str, Path]] | None = None, int8_backbone: Path | None = None,
                 torch_models: Callable[[], tuple[Any, Any]] | None = None,
                 engine_check: Callable[[], None] | None = None, head: bool = True) -> None:
        self.name, self.tile_px, self.feature_dim, self.has_head = name, tile_px, feature_dim, head
        self._graphs = {k: dict(v) for k, v in graphs.items()}
        self.engines = {p: dict(v) for p, v in (engines or {}).items()}
        self.int8_backbone, self._torch_models, self.engine_check = int8_backbone, torch_models, engine_check
        self._modules: tuple[Any, Any] | None = None

    @classmethod
    def from_package(cls, pkg: Any) -> ModelFiles:
        """The files of a loaded model package (:class:`slidemil.artifacts.package.Package`)."""
        from slidemil.artifacts.package import load_torch_models
        from slidemil.runtime.tensorrt_runner import check_engine_compatible
        m = pkg.manifest
        graphs = {kind: {p: pkg.path(rel) for p, rel in by_precision.items()} for kind, by_precision in m.graphs.items()}
        engines = {p: {k: pkg.path(rel) for k, rel in files.items()}
                   for p, files in ((m.tensorrt or {}).get("engines") or {}).items()}
        return cls(pkg.root.name, pkg.tile_px, pkg.card.feature_dim, graphs, engines,
                   pkg.openvino_int8(missing_ok=True), lambda: load_torch_models(pkg),
                   lambda: check_engine_compatible(pkg))

    # -- what is offered -----------------------------------------------------------------------
    def precisions(self, backend: str, device: str = "cpu") -> tuple[str, ...]:
        """Precisions ``backend`` can run this model's backbone at on ``device`` (empty: none)."""
        cuda = device.startswith("cuda")
        onnx = tuple(self._graphs.get("backbone", {}))
        if backend == "onnxruntime":
            return onnx
        if backend == "openvino":
            return () if cuda else (("int8",) if self.int8_backbone else ()) + (("bf16", "fp32") if "fp32" in onnx else ())
        if backend == "torch":
            return () if self._torch_models is None else (("fp16", "bf16", "fp32") if cuda else ("bf16", "fp32"))
        if backend == "tensorrt":
            return tuple(p for p, files in self.engines.items() if "backbone" in files) if cuda else ()
        raise ConfigError(f"unknown backend {backend!r}")

    def graph(self, kind: str, precision: str = "fp32") -> Path:
        """An ONNX graph; PackageError naming what there is when absent."""
        try:
            path = self._graphs[kind][precision]
        except KeyError:
            raise PackageError(f"{self.name} has no {precision} {kind} graph (it has "
                               f"{list(self._graphs.get(kind, {}))}); export again with --fp16 for fp16 graphs") from None
        if callable(path):
            path = self._graphs[kind][precision] = path()
        return path

    def engine(self, kind: str, precision: str) -> Path:
        try:
            return self.engines[precision][kind]
        except KeyError:
            raise PackageError(f"{self.name} has no {precision} TensorRT engine for the {kind}; build one on this "
                               f"GPU with: slidemil build-engine MODEL_DIR --{precision}") from None

    def torch_modules(self) -> tuple[Any, Any]:
        if self._torch_models is None:
            raise PackageError(f"{self.name} carries no torch weights for the torch backend")
        if self._modules is None:
            self._modules = self._torch_models()
        return self._modules


@dataclass(frozen=True)
class ExecutionPlan:
    """Where and how a model runs, every choice resolved (never ``auto``)."""

    backend: str
    device: str
    precision: str
    threads: int | None = None
    compile: bool = False  # torch.compile the torch backbone (on a GPU: reduce-overhead, with CUDA graphs)
    head: str = "onnxruntime"  # where the head runs: "onnxruntime" (CPU, fp32) or "torch" (the plan's device, fp32)
    cuda_graphs: bool = False  # torch on a GPU: the eager backbone captured once as a CUDA graph
    batch_size: int = 32  # tiles per batch (the torch runner halves it on out-of-memory)
    decode_on_device: bool = False  # JPEG tiles decoded on the plan's device, handed to the runner there

    def describe(self) -> str:
        compiled = ", compiled" if self.compile else ""
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        decode = ", tiles decoded on the device" if self.decode_on_device else ""
        return (f"{self.backend} on {self.device} at {self.precision}{compiled}{graphs}, batch {self.batch_size}"
                f"{decode}; head on {self.head}")

    @property
    def decode_device(self) -> str | None:
        """Where the tile pipeline decodes (``TilePipeline(decode_device=...)``), or None: in its reader threads."""
        return self.device if self.decode_on_device else None


# Preference of precision "auto" per backend, first offered wins.
def _auto_precisions(backend: str, device: str) -> tuple[str, ...]:
    cuda = device.startswith("cuda")
    if backend == "openvino":
        from slidemil.runtime.openvino_runner import cpu_supports_bf16
        return ("int8", "bf16", "fp32") if cpu_supports_bf16() else ("int8", "fp32")
    if backend == "tensorrt":
        return ("fp16", "fp32")
    if backend == "onnxruntime":
        return ("fp16", "fp32") if cuda else ("fp32",)
    if cuda:  # torch: bf16 autocast where the GPU has it (Ampere and later: no fp16 overflow), else fp16
        return ("bf16", "fp16") if cuda_bf16(device) else ("fp16",)
    return ("fp32",)  # torch on the CPU: exact fp32


def cuda_bf16(device: str) -> bool:
    """Whether the CUDA device runs bf16 natively (compute capability 8.0 or later); False without one."""
    import torch
    if not torch.cuda.is_available():
        return False
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def resolve_precision(files: ModelFiles, backend: str, device: str, requested: str = "auto") -> str:
    """``requested`` when the model offers it on this backend, or what ``auto`` means there:

    TensorRT fp16 engines where built; ONNX Runtime fp16 graphs on a GPU where exported, else fp32;
    OpenVINO the int8 backbone where ``slidemil quantize`` made one, else bf16 where the CPU has it,
    else fp32; torch bf16 autocast on a GPU that has bf16 (compute capability 8.0+), else fp16; fp32 on
    the CPU.

    Raises:
        PackageError: the model has no files for ``requested`` (naming how to make them).
    """
    offered = files.precisions(backend, device)
    if requested != "auto":
        if requested in offered:
            return requested
        hints = {"int8": "make one with: slidemil quantize MODEL_DIR --slides SLIDES",
                 "fp16": "export with --fp16 (ONNX) or build engines with slidemil build-engine"}
        raise PackageError(f"{files.name} cannot run on {backend} at {requested} on {device} (it offers "
                           f"{list(offered) or 'nothing'} there); {hints.get(requested, 'choose another precision')}")
    for precision in _auto_precisions(backend, device):
        if precision in offered:
            return precision
    if offered:
        return offered[0]
    raise PackageError(f"{files.name} has no files the {backend} backend can run on {device}")


def resolve_compile(mode: str, device: str, backend: str, precision: str) -> bool:
    """torch.compile or not: ``on``/``off``, or ``auto`` where it pays: bf16 on the CPU with a C++ compiler
    (measured on a 2-core AVX-512 CPU: about 2x eager there; fp32 gains little). On a GPU ``auto`` takes
    CUDA graphs of the eager module instead (:func:`resolve_cuda_graphs`): no compile time at start-up."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"unknown compile mode {mode!r}; use auto, on or off")
    if backend != "torch" or mode == "off":
        return False
    return mode == "on" or (not device.startswith("cuda") and precision == "bf16" and has_cxx_compiler())


def resolve_cuda_graphs(mode: str, device: str, backend: str) -> bool:
    """CUDA graphs of the eager torch backbone: with ``--torch-compile auto`` on a GPU (``on`` compiles in
    ``reduce-overhead`` mode, which captures graphs of its own; ``off`` runs eagerly)."""
    return backend == "torch" and device.startswith("cuda") and mode == "auto"


GPU_BATCH_MAX = 512  # tiles per batch on a GPU at most: larger batches gain nothing measurable
GPU_BATCH_MIN = 16
GPU_BATCH_DEFAULT = 256  # planned without a GPU to measure
GPU_MEMORY_SHARE = 0.5  # of the free memory, for the activations of one batch in flight and one decoded ahead
TILE_BYTES_PER_PIXEL = 96  # activation estimate when the model cannot be measured (about resnet50's in bf16)


def gpu_batch_size(free_bytes: int, tile_bytes: int, largest: int = GPU_BATCH_MAX, smallest: int = GPU_BATCH_MIN) -> int:
    """The largest power of two in [smallest, largest] whose batch needs at most ``GPU_MEMORY_SHARE`` of the
    free memory, at ``tile_bytes`` per tile (activations and the uint8 tile)."""
    batch = largest
    while batch > smallest and batch * tile_bytes > GPU_MEMORY_SHARE * free_bytes:
        batch //= 2
    return max(smallest, batch)


def measure_tile_bytes(module: Any, tile_px: int, device: str, precision: str, probe: int = 8) -> int:
    """Peak GPU memory per tile of ``module`` (uint8 NHWC tiles in) in one eager forward of ``probe`` tiles."""
    import torch
    dev = torch.device(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    module = module.eval().to(dev)
    tiles = torch.zeros((probe, tile_px, tile_px, 3), dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        module(tiles)
    torch.cuda.synchronize(dev)
    return max(1, (torch.cuda.max_memory_allocated(dev) - base) // probe)


def resolve_batch_size(files: ModelFiles, backend: str, device: str, precision: str, requested: int | None) -> int:
    """``requested``, or 32 on a CPU, or on a GPU from its free memory (:func:`gpu_batch_size`), the memory per
    tile measured on the torch module (estimated from the tile size for other backends)."""
    if requested:
        return requested
    if not device.startswith("cuda"):
        return 32
    import torch
    if not torch.cuda.is_available():  # planned for a GPU this machine lacks: building the runner says so
        return GPU_BATCH_DEFAULT
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    tile_bytes = TILE_BYTES_PER_PIXEL * files.tile_px ** 2
    if backend == "torch":
        try:
            tile_bytes = measure_tile_bytes(files.torch_modules()[0], files.tile_px, device, precision)
        except torch.OutOfMemoryError:
            return GPU_BATCH_MIN
    batch = gpu_batch_size(free, tile_bytes)
    log.info("batch size %d: %.0f MiB free on %s, %.1f MiB per tile", batch, free / 2**20, device, tile_bytes / 2**20)
    return batch


DEVICE_INPUT_BACKENDS = ("torch", "tensorrt", "onnxruntime")  # runners that take tiles already on a GPU


def resolve_decode(mode: str, device: str, backend: str) -> bool:
    """Whether tiles are decoded on the plan's device: ``auto`` on a GPU whose runner takes device tensors,
    ``device`` wherever the runner does (on a CPU device the same stages run on the CPU), ``cpu`` never."""
    if mode not in ("auto", "cpu", "device"):
        raise ConfigError(f"unknown decode mode {mode!r}; use auto, cpu or device")
    if mode == "cpu" or backend not in DEVICE_INPUT_BACKENDS:
        return False
    return mode == "device" or device.startswith("cuda")


def plan_execution(files: ModelFiles, backend: Backend = "auto", device: str = "auto", precision: Precision = "auto",
                   threads: int | None = None, torch_compile: CompileMode = "auto", batch_size: int | None = None,
                   decode: DecodeMode = "auto") -> ExecutionPlan:
    """Resolve backend (the fastest one present here that the model has files for), device, precision,
    compilation and CUDA graphs, the batch size and where tiles are decoded, once; see
    :func:`resolve_precision`, :func:`resolve_batch_size` and :func:`resolve_decode`."""
    device = resolve_device(device)
    name = choose_backend(backend, device, usable=lambda b: _worth_it(files, b, device))
    resolved = resolve_precision(files, name, device, precision)
    return ExecutionPlan(name, device, resolved, threads, resolve_compile(torch_compile, device, name, resolved),
                         "torch" if name == "torch" else "onnxruntime",
                         cuda_graphs=resolve_cuda_graphs(torch_compile, device, name),
                         batch_size=resolve_batch_size(files, name, device, resolved, batch_size),
                         decode_on_device=resolve_decode(decode, device, name))


def pipeline_settings(plans: list[ExecutionPlan]) -> tuple[int, str | None]:
    """Tiles per batch and decode device for the tile pipeline feeding the backbones of ``plans`` (an
    ensemble's members see the same batches): the smallest batch; the device only when every member
    decodes on the same one."""
    devices = {p.decode_device for p in plans}
    return min(p.batch_size for p in plans), devices.pop() if len(devices) == 1 else None


def _worth_it(files: ModelFiles, backend: str, device: str) -> bool:
    """Whether ``auto`` may take ``backend``: the model has files for it, and on a GPU ONNX Runtime only
    with fp16 graphs (torch's fp16 autocast beats ONNX Runtime's fp32 there)."""
    offered = files.precisions(backend, device)
    return bool(offered) and not (backend == "onnxruntime" and device.startswith("cuda") and "fp16" not in offered)


class RunnerPair(NamedTuple):
    """A model's backbone and head runners; activated together as a context manager."""

    backbone: Runner
    head: Runner

    def __enter__(self) -> RunnerPair:
        self.backbone.activate()
        self.head.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.backbone.deactivate()
        self.head.deactivate()


def tile_meta(tile_px: int) -> TensorMeta:
    """The backbone's input: uint8 RGB tiles, NHWC."""
    return TensorMeta("uint8", (None, tile_px, tile_px, 3))


def runner_for(files: ModelFiles, kind: str, backend: str, precision: str, device: str = "cpu",
               threads: int | None = None, compile: bool = False, cuda_graphs: bool = False,
               max_batch: int | None = None) -> Runner:
    """A runner of one of the model's files: ``kind`` ``backbone`` or ``head`` on ``backend`` at ``precision``."""
    if backend == "torch":
        backbone, head = files.torch_modules()
        if kind == "backbone":
            return TorchRunner(backbone, {"tiles": tile_meta(files.tile_px)}, ["features"], device=device,
                               precision=precision, compile=compile, cuda_graphs=cuda_graphs, max_batch=max_batch)
        return TorchRunner(head, {"features": TensorMeta("float32", (None, files.feature_dim))},
                           getattr(head, "output_names", HEAD_OUTPUTS), device=device, precision=precision,
                           channels_last=False, rowwise=False)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(files.graph(kind, precision), device=device, threads=threads)
    if backend == "openvino":
        from slidemil.runtime.openvino_runner import OpenVinoRunner
        if precision == "int8":
            if kind != "backbone" or files.int8_backbone is None:
                raise PackageError(f"{files.name} has no int8 {kind}; make one with: slidemil quantize MODEL_DIR "
                                   "--slides SLIDES")
            return OpenVinoRunner(files.int8_backbone, precision="int8", threads=threads)
        return OpenVinoRunner(files.graph(kind, "fp32"), precision=precision, threads=threads)
    if backend == "tensorrt":
        from slidemil.runtime.tensorrt_runner import TensorRTRunner
        if files.engine_check is not None:
            files.engine_check()
        return TensorRTRunner(files.engine(kind, precision), device=device)
    raise ConfigError(f"unknown backend {backend!r}")


def build_backbone_runner(files: ModelFiles, plan: ExecutionPlan) -> Runner:
    """The backbone runner of ``plan`` (not yet active: use it as a context manager)."""
    return runner_for(files, "backbone", plan.backend, plan.precision, plan.device, plan.threads, plan.compile,
                      plan.cuda_graphs, plan.batch_size if plan.device.startswith("cuda") else None)


def build_runners(files: ModelFiles, plan: ExecutionPlan) -> RunnerPair:
    """The backbone and head runners of ``plan`` (not yet active: use the pair as a context manager)."""
    if not files.has_head:
        raise ConfigError(f"{files.name} is a backbone without a head")
    backbone = build_backbone_runner(files, plan)
    if plan.head == "torch":
        return RunnerPair(backbone, runner_for(files, "head", "torch", "fp32", plan.device))
    return RunnerPair(backbone, runner_for(files, "head", "onnxruntime", "fp32", "cpu", plan.threads))


def backbone_files(module: Any, card: Any, work_dir: Path, tile_px: int) -> ModelFiles:
    """The files of a bare backbone (feature extraction): the torch module, and its ONNX graph written into
    ``work_dir`` the first time a backend asks for it."""
    def export() -> Path:
        from slidemil.models.onnx import export_backbone
        path = work_dir / f"backbone_{tile_px}px.onnx"
        if not path.is_file():
            os.makedirs(work_dir, exist_ok=True)
            export_backbone(module, path, tile_px)
        return path

    return ModelFiles(card.name, tile_px, card.feature_dim, {"backbone": {"fp32": export}},
                      torch_models=lambda: (module, None), head=False)
