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
from slidemil.errors import BackendUnavailableError, ConfigError
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
