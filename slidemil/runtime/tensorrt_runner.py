"""TensorRT runner: a serialised engine (``.plan``) executed with ``execute_async_v3`` on a CUDA stream.

Device buffers (torch CUDA tensors) and pinned host buffers are allocated once, at the largest
shape of the engine's optimisation profile, and reused for every call; ``set_input_shape`` gives
each call its actual batch or bag size. TensorRT is imported when a runner is built, never at import
time of this module.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import BackendUnavailableError, ConfigError, PackageError
from slidemil.runtime.runners import Runner, TensorMeta, is_tensor, register_runner

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt --extra-index-url https://pypi.nvidia.com "
                "(on a machine with an NVIDIA GPU and driver), or run slidemil in the Docker image built from "
                "docker/Dockerfile, which carries it")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, with a GPU to run it on; BackendUnavailableError saying how to get both."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(INSTALL_HINT) from exc
    import torch
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs an NVIDIA GPU and torch sees none here; build and run engines "
                                      "on the GPU machine that will score (a .plan is specific to one GPU model "
                                      "and TensorRT version)")
    return trt


def device_info() -> dict[str, str]:
    """GPU name, compute capability and TensorRT version of this machine (for manifests and checks)."""
    trt = import_tensorrt()
    import torch
    major, minor = torch.cuda.get_device_capability()
    return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "version": str(trt.__version__), "cuda": str(torch.version.cuda)}


def check_engine_compatible(pkg: Any) -> None:
    """PackageError if the package's engines were built for another GPU model or TensorRT version."""
    built = pkg.manifest.tensorrt or {}
    here = device_info()
    for key in ("compute_capability", "version"):
        if built.get(key) != here[key]:
            raise PackageError(
                f"the TensorRT engines in {pkg.root} were built for {built.get('gpu_name')} (compute capability "
                f"{built.get('compute_capability')}) with TensorRT {built.get('version')}; this machine has "
                f"{here['gpu_name']} ({here['compute_capability']}) with TensorRT {here['version']}. Rebuild them "
                f"here with: slidemil build-engine {pkg.root}")


@register_runner("tensorrt")
class TensorRTRunner(Runner):
    """A TensorRT engine on one GPU.

    Args:
        plan_path: serialised engine (``backbone_fp16.plan``...).
        device: "cuda" or "cuda:N".

    A backbone batch larger than the profile's maximum is run in chunks; a head bag larger than
    the maximum is an error (rebuild the engine with a larger ``--max-bag``). Inputs are numpy arrays
    (staged through pinned buffers) or torch tensors already on the GPU (copied device to device into
    the engine's input buffer on the runner's stream: tiles the device pipeline decoded there).
    """

    device_inputs = True

    def __init__(self, plan_path: str | Path, device: str = "cuda") -> None:
        self.plan_path, self.device_name = Path(plan_path), device if str(device).startswith("cuda") else "cuda"
        self.precision = "fp32" if "fp32" in self.plan_path.name else "fp16"

    def _activate(self) -> None:
        trt = import_tensorrt()
        import torch
        self._torch = torch
        self.device = torch.device(self.device_name)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with self._on_device():
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise PackageError(f"TensorRT cannot load {self.plan_path}: built for another GPU or TensorRT "
                                   f"version; rebuild with: slidemil build-engine {self.plan_path.parent}")
            self.context = self.engine.create_execution_context()
            self.stream = self._new_stream()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
            self.output_names = tuple(n for n in names if n not in self.input_names)
            profiles = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
            self.min_shapes = {n: tuple(p[0]) for n, p in profiles.items()}
            self.max_shapes = {n: tuple(p[2]) for n, p in profiles.items()}
            self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name for n in self.input_names}
            for name, shape in self.max_shapes.items():
                self.context.set_input_shape(name, shape)
            self._device_buf: dict[str, Any] = {}
            self._host_buf: dict[str, Any] = {}
            for name in names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                self._device_buf[name] = torch.empty(math.prod(shape), dtype=dtype, device=self.device)
                self._host_buf[name] = torch.empty(math.prod(shape), dtype=dtype, pin_memory=self.device.type == "cuda")
                self.context.set_tensor_address(name, self._device_buf[name].data_ptr())
        # The engine is batch-wise when every output's first axis follows the input's (backbone).
        self._batchwise = len(self.input_names) == 1 and all(
            tuple(self.context.get_tensor_shape(n))[:1] == self.max_shapes[self.input_names[0]][:1]
            for n in self.output_names)

    # -- where buffers and streams live: the GPU (a CPU stand-in replaces these in tests) ------------------
    def _on_device(self) -> Any:
        return self._torch.cuda.device(self.device)

    def _new_stream(self) -> Any:
        return self._torch.cuda.Stream(device=self.device)

    def _on_stream(self) -> Any:
        return self._torch.cuda.stream(self.stream)

    @classmethod
    def available(cls, device: str) -> bool:
        if not device.startswith("cuda"):
            return False
        try:
            import_tensorrt()
        except BackendUnavailableError:
            return False
        return True

    def input_metadata(self) -> dict[str, TensorMeta]:
        # dims that vary across the profile are dynamic; the first axis takes min..max of the profile
        return {n: TensorMeta(self._dtypes[n], tuple(hi if lo == hi else None for lo, hi in
                                                     zip(self.min_shapes[n], self.max_shapes[n])),
                              (int(self.min_shapes[n][0]), None if self._batchwise else int(self.max_shapes[n][0])))
                for n in self.input_names}

    def _infer(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        name = self.input_names[0]
        limit, n = self.max_shapes[name][0], len(feed[name])
        if n <= limit:
            return self._run(feed)
        if not self._batchwise:
            raise ConfigError(f"{self.plan_path.name} takes at most {limit} rows of {name!r}, got {n}; rebuild the "
                              "engine with a larger maximum (slidemil build-engine --max-bag/--max-batch)")
        parts = [self._run({name: feed[name][i:i + limit]}) for i in range(0, n, limit)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    def _run(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        torch = self._torch
        with self._on_device(), self._on_stream():
            for name in self.input_names:
                value = feed[name]
                if is_tensor(value) and value.device.type == self.device.type:  # on the GPU: device to device
                    size = value.numel()
                    self._device_buf[name][:size].copy_(value.reshape(-1), non_blocking=True)
                else:
                    if is_tensor(value):
                        value = value.numpy()
                    array = np.ascontiguousarray(value)
                    size = array.size
                    host = self._host_buf[name][:size]
                    host.copy_(torch.from_numpy(array).reshape(-1))
                    self._device_buf[name][:size].copy_(host, non_blocking=True)
                shape = tuple(value.shape)
                if not self.context.set_input_shape(name, shape):
                    raise ConfigError(f"{self.plan_path.name}: input {name!r} of shape {shape} is outside "
                                      f"the engine's profile (max {self.max_shapes[name]})")
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.plan_path.name} failed")
            shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}
            for name, shape in shapes.items():
                size = math.prod(shape)
                self._host_buf[name][:size].copy_(self._device_buf[name][:size], non_blocking=True)
            self.stream.synchronize()
        out = {}
        for name, shape in shapes.items():
            arr = self._host_buf[name][:math.prod(shape)].numpy().reshape(shape)
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr.copy()
        return out

    def _deactivate(self) -> None:
        self.context = None
        self.engine = None
        self._device_buf.clear()
        self._host_buf.clear()

    def describe(self) -> str:
        return f"tensorrt ({self.plan_path.name}, {self.device_name})"
