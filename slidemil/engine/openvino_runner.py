"""OpenVINO runner: ONNX graphs compiled for the CPU, bf16 on AMX/AVX-512 where the CPU has it.

The compiled model is cached in the user's cache folder so that a second run starts fast.
``precision="auto"`` uses bf16 when the CPU reports BF16 among its optimisation capabilities.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.atomic import file_lock
from slidemil.engine.runners import Runner, cpu_threads, register_runner
from slidemil.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/slidemil/openvino`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slidemil" / "openvino"


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
    """An ONNX graph compiled by OpenVINO for the CPU.

    Args:
        model_path: ``.onnx`` file.
        device: only "cpu" (OpenVINO's GPU plugin is for Intel GPUs, not used here).
        precision: "auto", "fp32" or "bf16" (the inference precision hint).
        threads: CPU threads (default: the cores this process may use).
        use_cache: keep compiled blobs in ``cache_dir()``.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, use_cache: bool = True) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailableError("OpenVINO is not installed: pip install openvino") from exc
        if device not in ("cpu", "auto"):
            raise BackendUnavailableError("the OpenVINO runner runs on the CPU; use --device cpu")
        if precision == "auto":
            precision = "bf16" if cpu_supports_bf16() else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"OpenVINO precision {precision!r}: use auto, fp32 or bf16")
        self.precision = precision
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads or cpu_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if use_cache:
            cache_dir().mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir())
        if use_cache:
            # Processes sharing the cache (array jobs) must not write the same blob at once.
            with file_lock(cache_dir() / "compile"):
                self.compiled = core.compile_model(str(model_path), "CPU", config)
        else:
            self.compiled = core.compile_model(str(model_path), "CPU", config)
        self.output_names = tuple(o.get_any_name() for o in self.compiled.outputs)
        self._requests = deque(self.compiled.create_infer_request() for _ in range(2))

    @classmethod
    def available(cls, device: str) -> bool:
        if device != "cpu":
            return False
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests[0]
        self._requests.rotate(-1)  # the next call uses the other request: outputs stay valid meanwhile
        result = request.infer(feed, share_inputs=True)
        return {name: np.array(result[out], copy=True) for name, out in zip(self.output_names, self.compiled.outputs)}

    def describe(self) -> str:
        return f"openvino (CPU, {self.precision})"
