"""TensorRT engines: clear refusals without TensorRT or a GPU (run everywhere); builds and parity on a GPU.

The ``gpu`` tests need ``tensorrt`` and a CUDA GPU (``pytest -m gpu``); elsewhere they skip with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slidemil.artifacts.package import load_package, write_manifest
from slidemil.cli import main
from slidemil.errors import BackendUnavailableError, ConfigError, PackageError
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import ParityConfig
from slidemil.exporter.tensorrt import TensorRTConfig, build_package_engines, optimisation_profiles
from slidemil.exporter.verify import smoke_test, verify_package
from slidemil.runtime.plan import ModelFiles, resolve_precision
from slidemil.runtime.runners import RUNNERS
from slidemil.runtime.tensorrt_runner import TensorRTRunner
from tests.test_exporter import QUICK, TILE_PX, make_checkpoint


def _tensorrt_usable() -> bool:
    return TensorRTRunner.available("cuda")


needs_no_tensorrt = pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT and a GPU are present here")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trt")
    ckpt = make_checkpoint(root / "run")
    return export_checkpoint(ckpt, root / "model", ExportConfig(parity=QUICK, exporter="legacy", max_batch=16)).root


def test_tensorrt_runner_is_registered_and_unavailable_on_cpu():
    assert RUNNERS["tensorrt"] is TensorRTRunner
    assert not TensorRTRunner.available("cpu")


def test_profiles_are_plain_data():
    profiles = optimisation_profiles(64, 96, TensorRTConfig(max_batch=32, opt_batch=16, max_bag=1000, opt_bag=100))
    assert json.loads(json.dumps(profiles)) == profiles
    assert profiles["backbone"]["tiles"] == {"min": [1, 64, 64, 3], "opt": [16, 64, 64, 3], "max": [32, 64, 64, 3]}
    assert profiles["head"]["features"] == {"min": [1, 96], "opt": [100, 96], "max": [1000, 96]}
    with pytest.raises(ConfigError):
        TensorRTConfig(precisions=("int8",))


@needs_no_tensorrt
def test_build_engine_without_tensorrt_says_how_to_get_it(package):
    with pytest.raises(BackendUnavailableError, match=r"pip install tensorrt --extra-index-url https://pypi\.nvidia"
                                                      r"\.com|NVIDIA GPU"):
        build_package_engines(package, TensorRTConfig())
    assert main(["build-engine", str(package)]) == 2
    assert load_package(package).manifest.tensorrt is None


@needs_no_tensorrt
def test_export_with_tensorrt_stops_before_writing(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    with pytest.raises(BackendUnavailableError, match="Docker image|NVIDIA GPU"):
        export_checkpoint(ckpt, tmp_path / "model", ExportConfig(tensorrt=True))
    assert not (tmp_path / "model").exists()


@needs_no_tensorrt
def test_verify_skips_engines_it_cannot_run_and_refuses_the_backend(package, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(package, copy)
    (copy / "backbone_fp16.plan").write_bytes(b"not an engine")
    (copy / "head_fp16.plan").write_bytes(b"not an engine")
    pkg = load_package(copy)
    section = {"gpu_name": "NVIDIA H100", "compute_capability": "9.0", "version": "10.9.0", "precision": ["fp16"],
               "engines": {"fp16": {"backbone": "backbone_fp16.plan", "head": "head_fp16.plan"}}, "profiles": {}}
    write_manifest(copy, dataclasses.replace(pkg.manifest, tensorrt=section))
    checks = {c.name: c for c in smoke_test(load_package(copy))}
    assert checks["tensorrt fp16 engines"].status == "skipped"
    assert "pip install tensorrt" in checks["tensorrt fp16 engines"].detail or "GPU" in checks["tensorrt fp16 engines"].detail
    files = ModelFiles.from_package(load_package(copy))
    assert files.engine("backbone", "fp16").name == "backbone_fp16.plan"
    assert resolve_precision(files, "tensorrt", "cuda") == "fp16"
    with pytest.raises(BackendUnavailableError):
        verify_package(copy, backend="tensorrt", parity=QUICK)


# --- on a GPU with TensorRT ----------------------------------------------------------------------------

@pytest.fixture
def trt_ready():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt --extra-index-url "
                                           "https://pypi.nvidia.com)")
    if not _tensorrt_usable():
        pytest.skip("no CUDA GPU visible to torch")


@pytest.mark.gpu
def test_build_engines_records_gpu_profiles_and_parity(trt_ready, package, tmp_path):
    cache = tmp_path / "timing.cache"
    cfg = TensorRTConfig(precisions=("fp16", "fp32"), max_batch=16, max_bag=20_000, opt_bag=512, workspace_gb=1,
                         timing_cache=str(cache))
    pkg = build_package_engines(package, cfg, ParityConfig(n_tiles=16, batch_sizes=(1, 7, 16), bag_sizes=(1, 500, 20_000)))
    section = pkg.manifest.tensorrt
    assert section["gpu_name"] and section["compute_capability"] and section["version"]
    assert section["profiles"]["backbone"]["tiles"]["max"] == [16, TILE_PX, TILE_PX, 3]
    assert section["profiles"]["head"]["features"]["max"] == [20_000, 96]
    assert section["parity"]["fp16"]["probabilities"]["max_abs"] <= 1e-2
    assert section["parity"]["fp16"]["argmax_agreement"] >= 0.999
    assert section["parity"]["fp32"]["probabilities"]["max_abs"] <= 1e-4
    assert {"backbone_fp16.plan", "head_fp16.plan", "backbone_fp32.plan"} <= set(pkg.manifest.files)
    assert cache.is_file() and cache.stat().st_size > 0
    assert verify_package(pkg.root, backend="tensorrt", precision="fp16", parity=QUICK).ok


@pytest.mark.gpu
def test_tensorrt_runner_dynamic_shapes(trt_ready, package):
    pkg = build_package_engines(package, TensorRTConfig(max_batch=16, max_bag=20_000, opt_bag=512, workspace_gb=1),
                                QUICK)
    rng = np.random.default_rng(0)
    with TensorRTRunner(pkg.engine("backbone", "fp16")) as backbone:
        for batch in (1, 7, 16, 40):  # 40 > max batch: run in chunks
            out = backbone.infer({"tiles": rng.integers(0, 256, (batch, TILE_PX, TILE_PX, 3), dtype=np.uint8)})
            assert out["features"].shape == (batch, 96) and out["features"].dtype == np.float32
    with TensorRTRunner(pkg.engine("head", "fp16")) as head:
        for n in (1, 500, 20_000):
            out = head.infer({"features": rng.standard_normal((n, 96)).astype(np.float32)})
            assert out["attention"].shape == (n,) and abs(float(out["probabilities"].sum()) - 1) < 1e-3
        with pytest.raises(ConfigError, match="max-bag"):
            head.infer({"features": np.zeros((20_001, 96), np.float32)})


# --- the runner against a fake ``tensorrt`` module, on the CPU ---------------------------------------------
# TensorRT 10's Python API as the runner uses it (Runtime, ICudaEngine's tensor queries, IExecutionContext's
# set_input_shape / set_tensor_address / execute_async_v3); "device" memory is host memory here, read and
# written through the addresses the runner binds, and the runner's CUDA device and stream are swapped for
# CPU stand-ins. The engine's "plan" is a JSON description of its tensors.

class _FakeContext:
    def __init__(self, engine: _FakeEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self.engine.profile[name]
        ok = len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.profile:
            return self.shapes[name]
        rows = self.shapes[self.engine.inputs[0]][0]
        return {"features": (rows, 3), "attention": (rows,), "probabilities": (2,)}[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _array(self, name: str) -> np.ndarray:
        import ctypes
        dtype = self.engine.dtypes[name]
        shape = self.get_tensor_shape(name)
        size = int(np.prod(shape)) * dtype.itemsize
        return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(self.addresses[name])).view(dtype).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        x = self._array(self.engine.inputs[0]).astype(np.float32)
        if self.engine.kind == "backbone":  # the mean colour of each tile, in fp16 as an fp16 engine gives it
            self._array("features")[...] = (x.mean(axis=(1, 2)) / 255).astype(np.float16)
        else:
            score = x.mean(axis=1)
            self._array("attention")[...] = score.astype(np.float16)
            p = 1 / (1 + np.exp(-score.mean()))
            self._array("probabilities")[...] = np.array([1 - p, p], np.float16)
        return True


class _FakeEngine:
    def __init__(self, spec: dict) -> None:
        self.kind, self.profile = spec["kind"], {k: tuple(map(tuple, v)) for k, v in spec["profile"].items()}
        self.inputs = list(self.profile)
        outputs = ["features"] if self.kind == "backbone" else ["attention", "probabilities"]
        self.names = self.inputs + outputs
        self.dtypes = {n: np.dtype(np.uint8 if self.kind == "backbone" and n in self.profile else
                                   np.float32 if n in self.profile else np.float16) for n in self.names}
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.profile else "output"

    def get_tensor_profile_shape(self, name: str, profile: int):
        return self.profile[name]

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtypes[name]

    def create_execution_context(self) -> _FakeContext:
        return _FakeContext(self)


def _fake_tensorrt():
    import types
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            try:
                return _FakeEngine(json.loads(data))
            except ValueError:
                return None  # as TensorRT: None for a plan it cannot load

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: dtype
    return trt


@pytest.fixture
def cpu_tensorrt(monkeypatch):
    import contextlib
    import types

    from slidemil.runtime import tensorrt_runner
    monkeypatch.setattr(tensorrt_runner, "import_tensorrt", _fake_tensorrt)

    class CpuTensorRTRunner(TensorRTRunner):
        def __init__(self, plan_path) -> None:
            super().__init__(plan_path)
            self.device_name = "cpu"

        def _on_device(self):
            return contextlib.nullcontext()

        def _new_stream(self):
            return types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)

        def _on_stream(self):
            return contextlib.nullcontext()

    return CpuTensorRTRunner


def _plan_file(tmp_path: Path, kind: str, profile: dict) -> Path:
    path = tmp_path / f"{kind}_fp16.plan"
    path.write_text(json.dumps({"kind": kind, "profile": profile}))
    return path


def test_tensorrt_runner_binds_buffers_runs_batches_in_chunks_and_takes_device_tensors(cpu_tensorrt, tmp_path):
    import torch
    plan = _plan_file(tmp_path, "backbone", {"tiles": [[1, 8, 8, 3], [8, 8, 8, 3], [16, 8, 8, 3]]})
    tiles = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    want = tiles.astype(np.float32).mean(axis=(1, 2)) / 255
    with cpu_tensorrt(plan) as runner:
        meta = runner.input_metadata()["tiles"]
        assert (meta.dtype, meta.shape, meta.batch_range) == ("uint8", (None, 8, 8, 3), (1, None))
        assert runner.device_inputs and runner.precision == "fp16"
        for n in (1, 7, 16, 40):  # 40 > the profile's 16: three runs
            out = runner.infer({"tiles": tiles[:n]})["features"]
            assert out.shape == (n, 3) and out.dtype == np.float32
            np.testing.assert_allclose(out, want[:n], atol=2e-3)
        on_device = runner.infer({"tiles": torch.from_numpy(tiles[:16])})["features"]  # a tensor on its device
        np.testing.assert_allclose(on_device, want[:16], atol=2e-3)
        streamed = [o["features"] for _, o in runner.infer_stream((i, {"tiles": torch.from_numpy(tiles[i:i + 10])})
                                                                   for i in range(0, 40, 10))]
        np.testing.assert_allclose(np.concatenate(streamed), want, atol=2e-3)


def test_tensorrt_head_engine_refuses_a_bag_above_its_profile(cpu_tensorrt, tmp_path):
    plan = _plan_file(tmp_path, "head", {"features": [[1, 4], [64, 4], [100, 4]]})
    with cpu_tensorrt(plan) as runner:
        out = runner.infer({"features": np.ones((100, 4), np.float32)})
        assert out["attention"].shape == (100,) and abs(float(out["probabilities"].sum()) - 1) < 1e-3
        with pytest.raises(ConfigError, match="max-bag"):
            runner.infer({"features": np.ones((101, 4), np.float32)})
    (tmp_path / "bad_fp16.plan").write_bytes(b"not an engine")
    with pytest.raises(PackageError, match="rebuild with: slidemil build-engine"):
        cpu_tensorrt(tmp_path / "bad_fp16.plan").activate()
