"""Inference runners: one interface over torch, ONNX Runtime, OpenVINO and TensorRT.

As Polygraphy's runners: building a runner is cheap and loads nothing; it is activated as a context
manager (``with runner:`` loads or compiles the model, leaving the block releases it) and then maps
named numpy inputs to named numpy outputs with ``infer(feed)``. An active runner declares its inputs
(``input_metadata()``: dtype, shape with None for dynamic axes, the batch range it takes). Runners
register by backend name; which backend, device and precision run is decided in one place,
:mod:`slidemil.runtime.plan`. Heavy backends are imported on activation, never at import time.

Inputs may also be torch tensors, e.g. tiles the device pipeline decoded on the GPU: a runner whose
``device_inputs`` is true takes a tensor on its device as it is (torch uses it, TensorRT copies it
device to device, ONNX Runtime CUDA binds its pointer); the others get it as a host array.
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

    def check(self, name: str, array: Any) -> None:
        """ConfigError when ``array`` (numpy array or torch tensor) does not fit (dtype, rank, fixed axes, batch range)."""
        fixed_ok = all(want is None or want == got for want, got in zip(self.shape[1:], array.shape[1:]))
        low, high = self.batch_range
        if (dtype_name(array) != self.dtype or array.ndim != len(self.shape) or not fixed_ok
                or len(array) < low or (high is not None and len(array) > high)):
            raise ConfigError(f"input {name!r} of {array.dtype} {array.shape} does not fit the model's {self.dtype} "
                              f"{self.shape} (batch {low}..{high or 'any'})")
def dtype_name(array: Any) -> str:
    """numpy's name of an array's or a torch tensor's dtype ("uint8", "float32", ...)."""
    return str(array.dtype).removeprefix("torch.")


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch where it is not loaded)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def host_array(value: Any) -> np.ndarray:
    """``value`` as a numpy array on the host (a torch tensor is copied off its device)."""
    if is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def host_feed(feed: Mapping[str, Any]) -> Feed:
    return {name: host_array(value) for name, value in feed.items()}


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
    device_inputs = False  # takes torch tensors on its device as they are (else they become host arrays)

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
        """Run the model on ``feed`` (numpy arrays or torch tensors); arrays come back on the host, float32
        unless integer."""
        self._require_active()
        return self._infer(feed if self.device_inputs else host_feed(feed))

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
            yield key, self._infer(feed if self.device_inputs else host_feed(feed))

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


TRACE_ENV = "SLIDEMIL_GPU_TRACE"  # a file: CUDA torch runners append their batches' GPU times to it (benchmarks)


@dataclass
class _Launched:
    """A batch whose work is queued: its outputs (host arrays, or pinned tensors filled when ``done``)."""

    rows: int
    outputs: list[Any]
    done: Any = None  # CUDA event after the outputs' copy to the host
    keep: tuple[Any, ...] = ()  # inputs (and pinned staging) that must live until ``done``


@register_runner("torch")
class TorchRunner(Runner):
    """A torch module. Inputs are numpy arrays or torch tensors; uint8 stays uint8.

    Args:
        module: maps the inputs, in ``input_names`` order, to a tensor or a tuple of tensors.
        input_names, output_names: names of the positional inputs and outputs.
        device: "cpu", "cuda" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (autocast), or "auto" (fp16 on GPU, fp32 on CPU).
        channels_last: use channels-last memory format (faster convolutions on CPU and GPU).
        compile: ``torch.compile`` the module (TorchInductor; the first batch takes tens of seconds; on a
            GPU in ``reduce-overhead`` mode, i.e. with CUDA graphs). Partial batches are padded to the
            largest batch seen so that shapes stay static and nothing recompiles, which is right for
            backbones (each output row depends on its own tile) and wrong for a MIL head.
        cuda_graphs: on a GPU, capture the eager module once as a CUDA graph at ``max_batch`` rows and
            replay it for every batch (partial batches use the first rows of the static input).
        max_batch: rows per forward; a larger batch runs in chunks. On CUDA out-of-memory it is halved
            and the batch retried (None: whole batches, halved from the batch size on the first error).
        rowwise: each output row depends on its own input row only (backbones): batches may be padded,
            chunked and backed off. False for a MIL head, which sees its whole bag at once.

    On a GPU, a tensor already on the device is used as it is; host arrays are staged through pinned
    memory and copied on a side stream, and ``infer_stream`` keeps one batch in flight (the next
    batch's copy overlaps the current batch's compute; outputs come back through pinned buffers).
    """

    device_inputs = True

    def __init__(self, module: Any, inputs: Mapping[str, TensorMeta], output_names: Sequence[str],
                 device: str = "cpu", precision: str = "fp32", channels_last: bool = True,
                 compile: bool = False, cuda_graphs: bool = False, max_batch: int | None = None,
                 rowwise: bool = True) -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"torch runs at fp32, fp16 or bf16, not {precision!r}")
        self._module, self._inputs = module, dict(inputs)
        self.input_names, self.output_names = tuple(inputs), tuple(output_names)
        self.device_name, self.precision = resolve_device(device), precision
        self.channels_last, self.compiled = channels_last, compile
        self.cuda_graphs = cuda_graphs and not compile and rowwise and len(self.input_names) == 1
        self.max_batch, self.rowwise = max_batch, rowwise
        self._fell_back = False  # torch.compile failed to build: running eagerly

    def _activate(self) -> None:
        import torch
        self._torch = torch
        self.device = torch.device(self.device_name)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:  # "cuda" is the current GPU: compare tensors' devices by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        module = self._module.eval().to(self.device)
        self.module = module.to(memory_format=torch.channels_last) if self.channels_last else module
        self._eager = self.module
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # static shapes: the fastest convolutions are found once
            self._stream = torch.cuda.Stream(self.device)  # compute
            self._copy_stream = torch.cuda.Stream(self.device)  # host-to-device copies of the next batch
        if self.compiled:
            self.module = torch.compile(self.module, dynamic=False, mode="reduce-overhead" if self._cuda else None)
        self._batch = 0  # largest batch seen (compiled modules pad smaller ones up to it)
        self._built = False
        self._graph: Any = None
        self._static_in: Any = None
        self._static_out: tuple[Any, ...] = ()
        self._trace: list[tuple[Any, Any, int]] | None = [] if self._cuda and os.environ.get(TRACE_ENV) else None

    def _deactivate(self) -> None:
        if self._trace:
            self._write_trace()
        self.module = self._eager = self._graph = self._static_in = None
        self._static_out = ()
        if self._cuda:
            self._torch.cuda.empty_cache()

    def input_metadata(self) -> dict[str, TensorMeta]:
        return dict(self._inputs)

    @classmethod
    def available(cls, device: str) -> bool:
        import torch
        return device == "cpu" or torch.cuda.is_available()

    # -- inference ---------------------------------------------------------------------------
    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        return self._collect(self._launch(feed))

    def infer_stream(self, feeds: Iterable[tuple[Key, Feed]]) -> Iterator[tuple[Key, dict[str, np.ndarray]]]:
        """On a GPU, batch k+1 is queued (its copy on the side stream, its compute behind batch k's) before
        batch k's outputs are taken; elsewhere one batch at a time."""
        self._require_active()
        if not self._cuda:
            for key, feed in feeds:
                yield key, self._infer(feed)
            return
        pending: tuple[Key, _Launched] | None = None
        try:
            for key, feed in feeds:
                previous, pending = pending, (key, self._launch(feed))
                if previous is not None:
                    yield previous[0], self._collect(previous[1])
            if pending is not None:
                last, pending = pending, None
                yield last[0], self._collect(last[1])
        finally:  # a read error in the feeds or an abandoned stream: the queued work ends before its buffers go
            if pending is not None and pending[1].done is not None:
                pending[1].done.synchronize()

    def _launch(self, feed: Feed) -> _Launched:
        torch = self._torch
        values = [feed[n] for n in self.input_names]
        rows = len(values[0])
        if not self._cuda:
            args = [_as_tensor(torch, v).to(self.device) for v in values]
            return _Launched(rows, [_to_numpy(t) for t in self._forward(args, rows)])
        with torch.cuda.device(self.device):
            staged = [self._upload(v) for v in values]
            args = [dev for dev, _ in staged]
            with torch.cuda.stream(self._stream):
                self._stream.wait_stream(self._copy_stream)
                start = self._event() if self._trace is not None else None
                outs = self._forward(args, rows)
                host = []
                for out in outs:
                    out = out.float() if out.is_floating_point() else out
                    pinned = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    pinned.copy_(out, non_blocking=True)
                    host.append(pinned)
                done = self._event()
                if self._trace is not None:
                    self._trace.append((start, done, rows))
        return _Launched(rows, host, done, keep=tuple(staged))

    def _collect(self, launched: _Launched) -> dict[str, np.ndarray]:
        if launched.done is None:
            return dict(zip(self.output_names, launched.outputs))
        launched.done.synchronize()
        return {name: np.array(t.numpy(), copy=True) for name, t in zip(self.output_names, launched.outputs)}

    def _event(self) -> Any:
        event = self._torch.cuda.Event(enable_timing=self._trace is not None)
        event.record(self._stream)
        return event

    def _upload(self, value: Any) -> tuple[Any, Any]:
        """(tensor on the device, host staging to keep alive): a tensor on the device as it is; host data
        through pinned memory, copied on the side stream."""
        torch = self._torch
        if is_tensor(value) and value.device == self.device:
            return value, None
        host = value if is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value))
        if host.device.type == "cpu" and not host.is_pinned():
            host = host.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            return host.to(self.device, non_blocking=True), host

    def _forward(self, args: list[Any], rows: int) -> list[Any]:
        """The module's outputs for ``rows`` rows, in chunks of ``max_batch``, backing off on out-of-memory."""
        torch = self._torch
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None,
                                                    cache_enabled=False):
            while True:
                try:
                    return self._chunks(args, rows)
                except torch.OutOfMemoryError as exc:
                    self._back_off(rows, exc)

    def _back_off(self, rows: int, exc: BaseException) -> None:
        current = self.max_batch or rows
        if not self.rowwise or current <= 1:
            raise exc
        self.max_batch = current // 2
        self._graph, self._static_in, self._static_out = None, None, ()
        self._batch = min(self._batch, self.max_batch)
        if self._cuda:
            self._torch.cuda.synchronize(self.device)
            self._torch.cuda.empty_cache()
        log.warning("%s: out of memory at %d rows per batch (%s); retrying at %d", self.describe(), current,
                    str(exc).splitlines()[0][:120] if str(exc) else "OutOfMemoryError", self.max_batch)

    def _chunks(self, args: list[Any], rows: int) -> list[Any]:
        step = min(self.max_batch or rows, rows) if self.rowwise else rows
        if step >= rows:
            return list(self._run(args))
        results: list[Any] = []
        for first in range(0, rows, step):
            outs = self._run([a[first:first + step] for a in args])
            if not results:
                results = [o.new_empty((rows, *o.shape[1:])) for o in outs]
            for result, out in zip(results, outs):
                result[first:first + len(out)].copy_(out)  # before the next chunk reuses graph outputs
        return results

    def _run(self, args: list[Any]) -> tuple[Any, ...]:
        """One forward of at most ``max_batch`` rows: the CUDA graph, or the (compiled) module."""
        rows = len(args[0])
        if self.cuda_graphs and self._cuda:
            return self._replay(args[0])
        if self.compiled and self.rowwise:
            self._batch = max(self._batch, rows)
            args = [_pad_tensor(a, self._batch) for a in args]
        out = self._call(args)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(o[:rows] for o in outs) if self.compiled and self.rowwise else outs

    def _replay(self, tiles: Any) -> tuple[Any, ...]:
        rows = len(tiles)
        size = max(self.max_batch or rows, rows)
        if self._graph is None or self._static_in.shape[0] < rows or self._static_in.shape[1:] != tiles.shape[1:]:
            self._capture(size, tiles)
        self._static_in[:rows].copy_(tiles)
        self._graph.replay()
        return tuple(o[:rows] for o in self._static_out)

    def _capture(self, rows: int, example: Any) -> None:
        """Capture the eager module as a CUDA graph on a static input of ``rows`` rows (after two warm-up
        runs on a side stream: cuDNN's algorithm search, lazy initialisation)."""
        torch = self._torch
        self._graph, self._static_in, self._static_out = None, None, ()
        static = torch.zeros((rows, *example.shape[1:]), dtype=example.dtype, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._module_call([static])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._module_call([static])
        self._graph, self._static_in = graph, static
        self._static_out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        self.max_batch = rows
        log.debug("%s: CUDA graph captured at %d rows", self.describe(), rows)

    def _module_call(self, args: list[Any]) -> Any:
        return self._eager(*args)

    def _call(self, args: list[Any]) -> Any:
        if self.compiled and self._cuda and not self._fell_back:
            self._torch.compiler.cudagraph_mark_step_begin()
        if not self.compiled or self._built:
            return self.module(*args)
        try:  # the first call builds the compiled graph
            out = self.module(*args)
        except self._torch.OutOfMemoryError:
            raise
        except Exception as exc:  # TorchInductor failing to build: no working compiler, an unsupported op
            log.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__, str(exc)[:200])
            self.module, self._fell_back = self._eager, True
            out = self.module(*args)
        self._built = True
        return out

    def _write_trace(self) -> None:
        """Append this runner's batches (GPU start and end in ms from its first batch, rows) to ``$SLIDEMIL_GPU_TRACE``."""
        import json
        torch = self._torch
        assert self._trace is not None
        self._trace[-1][1].synchronize()
        first = self._trace[0][0]
        batches = [[round(first.elapsed_time(s), 4), round(first.elapsed_time(e), 4), n] for s, e, n in self._trace]
        record = {"runner": self.describe(), "inputs": list(self.input_names), "batches": batches,
                  "peak_gpu_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
        with open(os.environ[TRACE_ENV], "a") as f:
            f.write(json.dumps(record) + "\n")

    def describe(self) -> str:
        compiled = ", compiled" if self.compiled and not self._fell_back else ""
        graphs = ", CUDA graphs" if self.cuda_graphs and self.device_name.startswith("cuda") else ""
        return f"torch ({self.device_name}, {self.precision}{compiled}{graphs})"


def _as_tensor(torch: Any, value: Any) -> Any:
    return value if is_tensor(value) else torch.as_tensor(value)


def _pad_tensor(t: Any, rows: int) -> Any:
    """``t`` with zero rows appended up to ``rows`` (a static shape for a compiled module)."""
    if len(t) >= rows:
        return t
    import torch
    return torch.cat([t, t.new_zeros((rows - len(t), *t.shape[1:]))])


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def _to_numpy(t: Any) -> np.ndarray:
    arr = t.detach()
    if arr.is_floating_point():
        arr = arr.float()
    return arr.cpu().numpy()


@register_runner("onnxruntime")
class OnnxRuntimeRunner(Runner):
    """An ONNX graph in ONNX Runtime: CPU provider with the given threads, or CUDA with IO binding (host
    arrays are copied in; torch tensors already on the GPU are bound by their device pointer)."""

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.model_path, self.device, self.threads = Path(model_path), resolve_device(device), threads
        self.precision = "fp16" if "fp16" in self.model_path.name else "fp32"
        self.device_inputs = self.device.startswith("cuda")  # CUDA tensors are bound by their device pointer

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

    def _infer(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        if not self.device.startswith("cuda"):
            return dict(zip(self.output_names, self.session.run(None, feed)))
        binding = self.session.io_binding()
        keep = []  # device tensors bound by pointer live until the run returns
        for name, value in feed.items():
            if is_tensor(value) and value.device.type == "cuda":
                tensor = value.contiguous()
                keep.append(tensor)
                binding.bind_input(name, "cuda", tensor.device.index or 0, np.dtype(dtype_name(tensor)),
                                   tuple(tensor.shape), tensor.data_ptr())
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(host_array(value)))
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
