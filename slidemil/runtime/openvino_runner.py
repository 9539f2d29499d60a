"""OpenVINO runner: ONNX graphs compiled for the CPU, bf16 on AMX/AVX-512 where the CPU has it.

The compiled model is cached in the user's cache folder so that a second run starts fast.
``precision="auto"`` uses bf16 when the CPU reports BF16 among its optimisation capabilities.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.atomic import file_lock
from slidemil.errors import BackendUnavailableError, ConfigError
from slidemil.runtime.runners import Feed, Key, Runner, TensorMeta, cpu_threads, host_feed, register_runner

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/slidemil/openvino`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slidemil" / "openvino"


def performance_hint(threads: int) -> str:
    """OpenVINO's hint for ``threads`` cores: one stream on a few cores, several on many.

    With THROUGHPUT, OpenVINO splits the cores into streams that each run a request; a single
    batch cannot keep many cores busy, several can. On 2 cores one stream of 2 threads scored 2%
    faster end to end than 2 streams of 1 and held 160 MB less (bench/score.py).
    """
    return "LATENCY" if threads <= 4 else "THROUGHPUT"


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16."""
    try:
        import openvino as ov
    except ImportError:
        return False
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in caps


@register_runner("openvino")
class OpenVinoRunner(Runner):
    """An ONNX graph (or a quantized OpenVINO IR) compiled by OpenVINO for the CPU.

    Args:
        model_path: ``.onnx`` file, or ``backbone_int8.xml`` for precision "int8".
        device: only "cpu" (OpenVINO's GPU plugin is for Intel GPUs, not used here).
        precision: "auto", "fp32" or "bf16" (the inference precision hint), or "int8" (a quantized IR).
        threads: CPU threads (default: the cores this process may use).
        use_cache: keep compiled blobs in ``cache_dir()``.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, use_cache: bool = True) -> None:
        if device != "cpu":
            raise BackendUnavailableError("the OpenVINO runner runs on the CPU; use --device cpu")
        if precision not in ("fp32", "bf16", "int8"):
            raise ConfigError(f"OpenVINO runs at fp32, bf16 or int8, not {precision!r}")
        if precision == "int8" and Path(model_path).suffix != ".xml":
            raise ConfigError(f"{Path(model_path).name} is not a quantized model; int8 runs backbone_int8.xml "
                              "(slidemil quantize)")
        self.model_path, self.precision, self.use_cache = Path(model_path), precision, use_cache
        self.threads = threads or cpu_threads()
        self.streams = 0

    def _activate(self) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailableError("OpenVINO is not installed: pip install openvino") from exc
        core = ov.Core()
        # int8 graphs keep some layers in floating point: bf16 for those where the CPU has it
        half = self.precision == "bf16" or (self.precision == "int8" and cpu_supports_bf16())
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if half else "f32",
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": performance_hint(self.threads),
        }
        if self.use_cache:
            cache_dir().mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir())
            # Processes sharing the cache (array jobs) must not write the same blob at once.
            with file_lock(cache_dir() / "compile"):
                self.compiled = core.compile_model(str(self.model_path), "CPU", config)
        else:
            self.compiled = core.compile_model(str(self.model_path), "CPU", config)
        self.output_names = tuple(o.get_any_name() for o in self.compiled.outputs)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        depth = max(2, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = deque(self.compiled.create_infer_request() for _ in range(depth))

    def _deactivate(self) -> None:
        self._requests.clear()
        del self.compiled

    def input_metadata(self) -> dict[str, TensorMeta]:
        out = {}
        for port in self.compiled.inputs:
            shape = tuple(int(d.get_length()) if d.is_static else None for d in port.get_partial_shape())
            out[port.get_any_name()] = TensorMeta(str(port.get_element_type().to_dtype()), shape)
        return out

    @classmethod
    def available(cls, device: str) -> bool:
        if device != "cpu":
            return False
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        request = self._requests[0]
        self._requests.rotate(-1)  # the next call uses the other request: outputs stay valid meanwhile
        request.infer(feed, share_inputs=True)
        return self._outputs(request)

    def infer_stream(self, feeds: Iterable[tuple[Key, Feed]]) -> Iterator[tuple[Key, dict[str, np.ndarray]]]:
        """Keep as many asynchronous requests in flight as the compiled model has streams (at least two).

        While the caller takes one batch's outputs and the reader threads hand over the next batch,
        the CPU plugin is already running the following one: the model never waits for Python.
        """
        self._require_active()
        idle = deque(self._requests)
        in_flight: deque[tuple[Key, Any, Feed]] = deque()  # the feed stays referenced: inputs are shared
        try:
            for key, given in feeds:
                feed = host_feed(given)
                if not idle:
                    yield self._finish(in_flight.popleft(), idle)
                request = idle.popleft()
                request.start_async(feed, share_inputs=True)
                in_flight.append((key, request, feed))
            while in_flight:
                yield self._finish(in_flight.popleft(), idle)
        finally:  # an error in the feeds (a bad tile) or an abandoned stream: let requests end before inputs go
            for _, request, _ in in_flight:
                request.wait()

    def _finish(self, item: tuple[Key, Any, Feed], idle: deque[Any]) -> tuple[Key, dict[str, np.ndarray]]:
        key, request, _ = item
        request.wait()
        outputs = self._outputs(request)
        idle.append(request)
        return key, outputs

    def _outputs(self, request: Any) -> dict[str, np.ndarray]:
        return {name: np.array(request.get_tensor(out).data, copy=True)
                for name, out in zip(self.output_names, self.compiled.outputs)}

    def describe(self) -> str:
        streams = f", {self.streams} stream{'s' if self.streams > 1 else ''}" if self.streams else ""
        return f"openvino (CPU, {self.precision}{streams})"
