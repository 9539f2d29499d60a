"""Model packages opened for scoring: a backbone runner and a head runner per package.

The engine reads nothing but the package (``exporter.package.load_package``). ``open_models``
picks a backend per package (``auto``: the fastest one present for the device that the package has
files for), builds its runners through a small registry of builders, and checks that an ensemble's
members agree on class names and tiling.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import ConfigError, PackageError
from slidemil.runtime.runners import OnnxRuntimeRunner, Runner, TorchRunner, choose_backend, resolve_device

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One package ready to run: its runners and what it says about itself."""

    name: str
    package: Any  # exporter.package.Package
    backbone: Runner
    head: Runner
    backend: str


@dataclass(frozen=True)
class RunnerSettings:
    """How to run a package: device ("cpu", "cuda:N"), precision, CPU threads, torch.compile mode."""

    device: str = "cpu"
    precision: str = "auto"
    threads: int | None = None
    torch_compile: str = "auto"


RunnerPair = tuple[Runner, Runner]
Builder = Callable[[Any, RunnerSettings], RunnerPair]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def decorator(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn
    return decorator


def _cpu_head(package: Any, threads: int | None) -> Runner:
    # The head is a few matrix products over (N, D): ONNX Runtime on the CPU keeps it exact (fp32) and
    # frees the accelerator for the next slide's backbone batches.
    return OnnxRuntimeRunner(package.head_onnx, device="cpu", threads=threads)


@builder("onnxruntime")
def _onnxruntime(package: Any, s: RunnerSettings) -> RunnerPair:
    return OnnxRuntimeRunner(package.backbone_onnx_for(s.device, s.precision), device=s.device, threads=s.threads), \
        _cpu_head(package, s.threads)


@builder("openvino")
def _openvino(package: Any, s: RunnerSettings) -> RunnerPair:
    """``auto`` takes the package's int8 backbone where ``slidemil quantize`` made one (its parity was
    checked then), else bf16 where the CPU has it, else fp32."""
    from slidemil.runtime.openvino_runner import OpenVinoRunner
    int8 = package.openvino_int8(missing_ok=s.precision != "int8")
    if s.precision == "int8" or (s.precision == "auto" and int8 is not None):
        backbone = OpenVinoRunner(int8, precision="int8", threads=s.threads)
    else:
        ov_precision = "auto" if s.precision == "auto" else ("bf16" if s.precision == "bf16" else "fp32")
        backbone = OpenVinoRunner(package.backbone_onnx, precision=ov_precision, threads=s.threads)
    return backbone, _cpu_head(package, s.threads)


@builder("torch")
def _torch(package: Any, s: RunnerSettings) -> RunnerPair:
    from slidemil.artifacts.package import load_torch_models
    backbone, head = load_torch_models(package)
    return (TorchRunner(backbone, ["tiles"], ["features"], device=s.device, precision=s.precision,
                        compile=s.torch_compile),
            TorchRunner(head, ["features"], ["logits", "probabilities", "attention", "attention_raw"],
                        device=s.device, precision="fp32", channels_last=False))


@builder("tensorrt")
def _tensorrt(package: Any, s: RunnerSettings) -> RunnerPair:
    from slidemil.runtime.tensorrt_runner import TensorRTRunner
    plan = package.engine_path("backbone", s.precision)
    return TensorRTRunner(plan, device=s.device), _cpu_head(package, s.threads)


def _has_files_for(package: Any, backend: str) -> bool:
    if backend == "tensorrt":
        return package.engine_path("backbone", "auto", missing_ok=True) is not None
    return True


@contextlib.contextmanager
def open_models(model_dirs: Sequence[str | Path], backend: str = "auto", device: str = "auto",
                precision: str = "auto", threads: int | None = None,
                torch_compile: str = "auto") -> Iterator[list[LoadedModel]]:
    """Load each package (checksums verified) and build its runners; close them all on exit.

    ``torch_compile`` applies to the torch backend only (see ``TorchRunner``).
    """
    from slidemil.artifacts.package import load_package
    if not model_dirs:
        raise ConfigError("give at least one model package (MODEL_DIR or --model)")
    device = resolve_device(device)
    settings = RunnerSettings(device, precision, threads, torch_compile)
    with contextlib.ExitStack() as stack:
        models = []
        for model_dir in model_dirs:
            package = load_package(model_dir)
            name = choose_backend(backend, device, usable=functools.partial(_has_files_for, package))
            backbone, head = BUILDERS[name](package, settings)
            stack.enter_context(backbone)
            stack.enter_context(head)
            log.info("model %s: backbone on %s", Path(model_dir).name, backbone.describe())
            models.append(LoadedModel(Path(model_dir).name, package, backbone, head, name))
        check_ensemble(models)
        yield models


def warm_up(models: Sequence[LoadedModel], batch_size: int) -> None:
    """Run each backbone once on a blank batch of full size: compilation, allocation and autotuning
    happen here, counted as model loading, and not on the first slide."""
    for m in models:
        px = m.package.tiling.tile.patch_size
        m.backbone.infer({"tiles": np.zeros((batch_size, px, px, 3), np.uint8)})


def check_ensemble(models: list[LoadedModel]) -> None:
    """Members of an ensemble share class names, tile size and mpp (they score the same tiles)."""
    first = models[0].package
    for m in models[1:]:
        p = m.package
        if list(p.class_names) != list(first.class_names):
            raise PackageError(f"ensemble members disagree on class names: {first.class_names} vs {p.class_names}")
        if (p.tiling.tile.patch_size, p.tiling.tile.mpp) != (first.tiling.tile.patch_size, first.tiling.tile.mpp):
            raise PackageError("ensemble members must share tile size and mpp: "
                               f"{first.tiling.tile} vs {p.tiling.tile}")
