"""Inference runners: one interface over torch, ONNX Runtime, OpenVINO and TensorRT.

As Polygraphy's runners: building a runner is cheap and loads nothing; it is activated as a context
manager (``with runner:`` loads or compiles the model, leaving the block releases it) and then maps
named numpy inputs to named numpy outputs with ``infer(feed)``. An active runner declares its inputs
(``input_metadata()``: dtype, shape with None for dynamic axes, the batch range it takes). Runners
register by backend name; which backend, device and precision run is decided in one place,
:mod:`slidemil.runtime.plan`. Heavy backends are imported on activation, never at import time.
"""

from __future__ import annotations

import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from slidemil.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

RUNNERS: dict[str, type[Runner]] = {}
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorMeta:
    """What a runner takes as one input: numpy dtype name, shape (None: dynamic) and first-axis range."""

    dtype: str
    shape: tuple[int | None, ...]
    batch_range: tuple[int, int | None] = (1, None)  # min and max of the first axis (None: no limit)

    def check(self, name: str, array: np.ndarray) -> None:
        """ConfigError when ``array`` does not fit (dtype, rank, fixed axes, batch range)."""
        fixed_ok = all(want is None or want == got for want, got in zip(self.shape[1:], array.shape[1:]))
        low, high = self.batch_range
        if (str(array.dtype) != self.dtype or array.ndim != len(self.shape) or not fixed_ok
                or len(array) < low or (high is not None and len(array) > high)):
            raise ConfigError(f"input {name!r} of {array.dtype} {array.shape} does not fit the model's {self.dtype} "
                              f"{self.shape} (batch {low}..{high or 'any'})")
Key = TypeVar("Key")
# Preference of ``auto``, fastest first, per device kind.
AUTO_ORDER = {"cuda": ("tensorrt", "onnxruntime", "torch"), "cpu": ("openvino", "onnxruntime", "torch")}


def register_runner(name: str) -> Callable[[type[Runner]], type[Runner]]:
    """Class decorator adding a runner to the registry."""
    def decorator(cls: type[Runner]) -> type[Runner]:
        cls.backend = name
        RUNNERS[name] = cls
        return cls
    return decorator


class Runner(ABC):
    """A model that maps named numpy inputs to named numpy outputs once activated (``with runner:``).

    Subclasses load the model in ``_activate``, release it in ``_deactivate`` and run it in ``_infer``.
    """

    backend = "abstract"
    output_names: tuple[str, ...] = ()
    precision = "fp32"
    active = False

    @classmethod
    def available(cls, device: str) -> bool:
        """Whether the backend is installed and can run on ``device`` ("cpu" or "cuda")."""
        return True

    # -- activation (Polygraphy's model) ----------------------------------------------------
    def activate(self) -> Runner:
        """Load the model (idempotent); returns the runner."""
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        """Release the model and its device memory (idempotent)."""
        if self.active:
            self.active = False
            self._deactivate()

    close = deactivate

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None:
        """Load or compile the model."""

    def _deactivate(self) -> None:
        """Drop the model."""

    def _require_active(self) -> None:
        if not self.active:
            raise RuntimeError(f"{type(self).__name__} is not active: use it inside `with runner:` (or activate())")

    # -- inference ---------------------------------------------------------------------------
    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run the model on ``feed``; arrays come back on the host, float32 unless integer."""
        self._require_active()
        return self._infer(feed)

    @abstractmethod
    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """``infer`` of an active runner."""

    def infer_stream(self, feeds: Iterable[tuple[Key, Feed]]) -> Iterator[tuple[Key, dict[str, np.ndarray]]]:
        """``(key, outputs)`` for each ``(key, feed)``, in order.

        This one runs the feeds one at a time. Runners with asynchronous requests override it to keep
        the next feed in flight while the caller takes the outputs of the current one.
        """
        self._require_active()
        for key, feed in feeds:
            yield key, self._infer(feed)

    @abstractmethod
    def input_metadata(self) -> dict[str, TensorMeta]:
        """The inputs of the active model, by name."""

    def describe(self) -> str:
        return self.backend


def cpu_threads() -> int:
    """Cores this process may use (respects affinity masks and SLURM's CPU allocation)."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@register_runner("torch")
class TorchRunner(Runner):
    """A torch module. Inputs are moved to the device as they are (uint8 stays uint8).

    Args:
        module: maps the inputs, in ``input_names`` order, to a tensor or a tuple of tensors.
        input_names, output_names: names of the positional inputs and outputs.
        device: "cpu", "cuda" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (autocast), or "auto" (fp16 on GPU, fp32 on CPU).
        channels_last: use channels-last memory format (faster convolutions on CPU and GPU).
        compile: "on" compiles the module with ``torch.compile`` (TorchInductor; the first batch takes
            tens of seconds), "off" runs it eagerly, "auto" compiles where it pays: bf16 on the CPU
            with a C++ compiler present (about 2x eager there). Partial batches are padded to the
            largest batch seen so that shapes stay static and nothing recompiles, which is right for
            backbones (each output row depends on its own tile) and wrong for a MIL head.
    """

    def __init__(self, module: Any, inputs: Mapping[str, TensorMeta], output_names: Sequence[str],
                 device: str = "cpu", precision: str = "fp32", channels_last: bool = True,
                 compile: bool = False) -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"torch runs at fp32, fp16 or bf16, not {precision!r}")
        self._module, self._inputs = module, dict(inputs)
        self.input_names, self.output_names = tuple(inputs), tuple(output_names)
        self.device_name, self.precision = resolve_device(device), precision
        self.channels_last, self.compiled = channels_last, compile
        self._fell_back = False  # torch.compile failed to build: running eagerly

    def _activate(self) -> None:
        import torch
        self._torch = torch
        self.device = torch.device(self.device_name)
        module = self._module.eval().to(self.device)
        self.module = module.to(memory_format=torch.channels_last) if self.channels_last else module
        self._eager = self.module
        if self.compiled:
            self.module = torch.compile(self.module, dynamic=False)
        self._batch = 0  # largest batch seen (compiled modules pad smaller ones up to it)
        self._built = False

    def _deactivate(self) -> None:
        self.module = self._eager = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def input_metadata(self) -> dict[str, TensorMeta]:
        return dict(self._inputs)

    @classmethod
    def available(cls, device: str) -> bool:
        import torch
        return device == "cpu" or torch.cuda.is_available()

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        torch = self._torch
        arrays = [feed[n] for n in self.input_names]
        n = len(arrays[0])
        if self.compiled:
            self._batch = max(self._batch, n)
            arrays = [_pad_rows(a, self._batch) for a in arrays]
        args = [torch.as_tensor(a).to(self.device, non_blocking=True) for a in arrays]
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self._call(args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: _to_numpy(t[:n] if self.compiled else t) for name, t in zip(self.output_names, outs)}

    def _call(self, args: list[Any]) -> Any:
        if not self.compiled or self._built:
            return self.module(*args)
        try:  # the first call builds the compiled graph
            out = self.module(*args)
        except Exception as exc:  # TorchInductor failing to build: no working compiler, an unsupported op
            log.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__, str(exc)[:200])
            self.module, self._fell_back = self._eager, True
            out = self.module(*args)
        self._built = True
        return out

    def describe(self) -> str:
        compiled = ", compiled" if self.compiled and not self._fell_back else ""
        return f"torch ({self.device_name}, {self.precision}{compiled})"


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows`` (a static shape for a compiled module)."""
    if len(a) >= rows:
        return a
    pad = np.zeros((rows - len(a), *a.shape[1:]), dtype=a.dtype)
    return np.concatenate([a, pad])


def _to_numpy(t: Any) -> np.ndarray:
    arr = t.detach()
    if arr.is_floating_point():
        arr = arr.float()
    return arr.cpu().numpy()


@register_runner("onnxruntime")
class OnnxRuntimeRunner(Runner):
    """An ONNX graph in ONNX Runtime: CPU provider with the given threads, or CUDA with IO binding."""

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.model_path, self.device, self.threads = Path(model_path), resolve_device(device), threads
        self.precision = "fp16" if "fp16" in self.model_path.name else "fp32"

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                          "(or onnxruntime-gpu for CUDA)") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or cpu_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError("ONNX Runtime has no CUDA provider: install onnxruntime-gpu "
                                              "(pip install 'slidemil[gpu]') in place of onnxruntime")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": _device_index(self.device)})]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def _deactivate(self) -> None:
        del self.session

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {i.name: TensorMeta(ORT_DTYPES.get(i.type, i.type),
                                   tuple(d if isinstance(d, int) else None for d in i.shape))
                for i in self.session.get_inputs()}

    @classmethod
    def available(cls, device: str) -> bool:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        return device == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.device.startswith("cuda"):
            return dict(zip(self.output_names, self.session.run(None, feed)))
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            binding.bind_output(name, "cuda", _device_index(self.device))
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def describe(self) -> str:
        provider = "CUDAExecutionProvider" if self.device.startswith("cuda") else "CPUExecutionProvider"
        return f"onnxruntime ({provider})"


ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}


def _device_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def available_backends(device: str) -> list[str]:
    """Backends that can run on ``device`` here, fastest first."""
    _load_optional_runners()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return [name for name in AUTO_ORDER[kind] if name in RUNNERS and RUNNERS[name].available(kind)]


def choose_backend(backend: str, device: str, usable: Callable[[str], bool] = lambda name: True) -> str:
    """``backend`` itself, or with ``auto`` the fastest available one that ``usable`` accepts."""
    _load_optional_runners()
    if backend != "auto":
        if backend not in RUNNERS:
            raise ConfigError(f"unknown backend {backend!r}; known: {sorted(RUNNERS)} or auto")
        return backend
    for name in available_backends(device):
        if usable(name):
            log.info("backend auto: using %s on %s", name, device)
            return name
    raise BackendUnavailableError(f"no inference backend available for {device}")


def _load_optional_runners() -> None:
    import importlib
    for module in ("slidemil.runtime.openvino_runner", "slidemil.runtime.tensorrt_runner"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
