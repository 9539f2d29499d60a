"""The GPU path's decisions and runner, checked on the CPU where they can be: what the planner decides
(device decoding, batch size, CUDA graphs, precision), device tensors in runners, the out-of-memory
back-off (with an injected error). The ``gpu`` tests run the same on a CUDA GPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from slidemil.errors import ConfigError
from slidemil.models.onnx import export_graph
from slidemil.runtime import plan
from slidemil.runtime.plan import (
    ExecutionPlan,
    ModelFiles,
    gpu_batch_size,
    pipeline_settings,
    plan_execution,
    resolve_cuda_graphs,
    resolve_decode,
)
from slidemil.runtime.runners import OnnxRuntimeRunner, TensorMeta, TorchRunner
from tests.test_runners import _TileNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _OomAbove(nn.Module):
    """_TileNet that raises CUDA's out-of-memory error for batches above ``limit`` rows (as a GPU would)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.sizes = _TileNet(), limit, []

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(tiles))
        if len(tiles) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(tiles)} GiB")
        return self.net(tiles)


TILES = {"tiles": TensorMeta("uint8", (None, 32, 32, 3))}


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


def _files(tmp_path=None) -> ModelFiles:
    return ModelFiles("tilenet", 32, 8, {"backbone": {"fp32": tmp_path or "unused.onnx"}},
                      torch_models=lambda: (_TileNet(), None), head=False)


# -- the planner -------------------------------------------------------------------------------------

def test_the_planner_decides_where_tiles_are_decoded():
    assert resolve_decode("auto", "cuda", "torch") and resolve_decode("auto", "cuda:1", "tensorrt")
    assert resolve_decode("auto", "cuda", "onnxruntime")  # IO binding of the device pointer
    assert not resolve_decode("auto", "cpu", "torch") and not resolve_decode("auto", "cpu", "openvino")
    assert not resolve_decode("cpu", "cuda", "torch")
    assert resolve_decode("device", "cpu", "torch")  # the device stages on the CPU (tests, comparisons)
    assert not resolve_decode("device", "cpu", "openvino")  # a runner that takes no device tensors
    with pytest.raises(ConfigError, match="decode mode"):
        resolve_decode("gpu", "cuda", "torch")
    p = plan_execution(_files(), "torch", "cpu", decode="device")
    assert p.decode_on_device and p.decode_device == "cpu" and p.batch_size == 32
    assert "tiles decoded on the device" in p.describe() and "batch 32" in p.describe()
    assert plan_execution(_files(), "torch", "cpu").decode_device is None
    assert plan_execution(_files(), "torch", "cpu", batch_size=7).batch_size == 7


def test_an_ensemble_decodes_on_the_device_only_when_every_member_does():
    a = ExecutionPlan("torch", "cuda", "bf16", batch_size=512, decode_on_device=True)
    b = ExecutionPlan("tensorrt", "cuda", "fp16", batch_size=256, decode_on_device=True)
    c = ExecutionPlan("onnxruntime", "cpu", "fp32", batch_size=32)
    assert pipeline_settings([a, b]) == (256, "cuda")
    assert pipeline_settings([a, c]) == (32, None)


def test_gpu_batch_size_follows_free_memory():
    gib = 2**30
    assert gpu_batch_size(80 * gib, 8 * 2**20) == 512  # resnet50-size tiles on an 80 GB GPU: the cap
    assert gpu_batch_size(4 * gib, 8 * 2**20) == 256  # 2 GiB for activations at 8 MiB a tile
    assert gpu_batch_size(1 * gib, 8 * 2**20) == 64
    assert gpu_batch_size(10 * 2**20, 8 * 2**20) == 16  # never below the floor: the runner backs off from there


def test_cuda_graphs_and_bf16_on_a_gpu(monkeypatch):
    assert resolve_cuda_graphs("auto", "cuda", "torch")
    assert not resolve_cuda_graphs("on", "cuda", "torch")  # torch.compile's reduce-overhead captures its own
    assert not resolve_cuda_graphs("off", "cuda", "torch") and not resolve_cuda_graphs("auto", "cpu", "torch")
    assert not resolve_cuda_graphs("auto", "cuda", "tensorrt")
    assert plan.resolve_compile("auto", "cuda", "torch", "bf16") is False  # graphs instead of a long compile
    monkeypatch.setattr(plan, "cuda_bf16", lambda device: True)
    assert plan._auto_precisions("torch", "cuda") == ("bf16", "fp16")
    monkeypatch.setattr(plan, "cuda_bf16", lambda device: False)  # pre-Ampere GPUs: fp16
    assert plan._auto_precisions("torch", "cuda") == ("fp16",)
    assert plan._auto_precisions("torch", "cpu") == ("fp32",)


# -- runners and device tensors ----------------------------------------------------------------------

def test_torch_runner_takes_a_tensor_on_its_device_as_it_is(tiles):
    with TorchRunner(_TileNet(), TILES, ["features"], channels_last=False) as runner:
        from_numpy = runner.infer({"tiles": tiles})["features"]
        from_tensor = runner.infer({"tiles": torch.from_numpy(tiles)})["features"]
        streamed = [out["features"] for _, out in runner.infer_stream(
            (i, {"tiles": torch.from_numpy(tiles[i:i + 8])}) for i in range(0, 20, 8))]
    np.testing.assert_array_equal(from_numpy, from_tensor)
    np.testing.assert_array_equal(np.concatenate(streamed), from_numpy)
    assert from_tensor.dtype == np.float32


def test_host_runners_get_tensors_as_host_arrays(tiles, tmp_path):
    path = tmp_path / "tilenet.onnx"
    export_graph(_TileNet().eval(), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), path, ("tiles",), ("features",), "n")
    with OnnxRuntimeRunner(path, threads=1) as runner:
        assert not runner.device_inputs
        np.testing.assert_array_equal(runner.infer({"tiles": torch.from_numpy(tiles)})["features"],
                                      runner.infer({"tiles": tiles})["features"])
        streamed = list(runner.infer_stream([(0, {"tiles": torch.from_numpy(tiles)})]))
        assert streamed[0][1]["features"].shape == (20, 8)


def test_out_of_memory_halves_the_batch_and_retries(tiles, caplog):
    module = _OomAbove(limit=6)
    with TorchRunner(module, TILES, ["features"], channels_last=False) as runner, caplog.at_level(logging.WARNING):
        out = runner.infer({"tiles": tiles})["features"]  # 20 rows: fails, 10 fails, 5 fits
        assert runner.max_batch == 5
        again = [o["features"] for _, o in runner.infer_stream((i, {"tiles": tiles[i:i + 8]}) for i in (0, 8, 16))]
    with torch.inference_mode():
        want = _TileNet()(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(again), want, rtol=1e-6, atol=1e-7)
    assert module.sizes[:3] == [20, 10, 5] and max(module.sizes[3:]) == 5  # later batches run in chunks of 5
    assert "out of memory at 20 rows per batch" in caplog.text and "retrying at 10" in caplog.text


def test_out_of_memory_in_a_head_is_raised_not_chunked(tiles):
    with TorchRunner(_OomAbove(limit=6), TILES, ["features"], channels_last=False, rowwise=False) as runner:
        with pytest.raises(torch.OutOfMemoryError):
            runner.infer({"tiles": tiles})  # a MIL head must see its whole bag
        assert runner.max_batch is None


def test_out_of_memory_at_one_row_is_raised(tiles):
    with TorchRunner(_OomAbove(limit=0), TILES, ["features"], channels_last=False, max_batch=2) as runner:
        with pytest.raises(torch.OutOfMemoryError):
            runner.infer({"tiles": tiles[:4]})
        assert runner.max_batch == 1


def test_a_planned_batch_limit_runs_larger_batches_in_chunks(tiles):
    module = _OomAbove(limit=100)
    with TorchRunner(module, TILES, ["features"], channels_last=False, max_batch=8) as runner:
        out = runner.infer({"tiles": tiles})["features"]
    assert module.sizes == [8, 8, 4] and out.shape == (20, 8)


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_runner_matches_eager_fp32_and_takes_device_tensors(tiles):
    with torch.inference_mode():
        want = _TileNet()(torch.from_numpy(tiles)).numpy()
    with TorchRunner(_TileNet(), TILES, ["features"], device="cuda", precision="bf16", cuda_graphs=True,
                     max_batch=8) as runner:
        assert "CUDA graphs" in runner.describe()
        on_device = torch.from_numpy(tiles).cuda()
        streamed = [o["features"] for _, o in runner.infer_stream(
            (i, {"tiles": on_device[i:i + 8]}) for i in range(0, 20, 8))]  # 8, 8 and a partial 4
        from_host = runner.infer({"tiles": tiles})["features"]  # 20 rows: chunks of the graph's 8
        assert runner._graph is not None and runner._static_in.shape[0] == 8
    got = np.concatenate(streamed)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)  # bf16 autocast
    np.testing.assert_allclose(from_host, got, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_torch_compile_reduce_overhead_on_cuda(tiles):
    with TorchRunner(_TileNet(), TILES, ["features"], device="cuda", precision="fp16", compile=True,
                     max_batch=8) as runner:
        outs = [o["features"] for _, o in runner.infer_stream((i, {"tiles": tiles[i:i + 8]}) for i in range(0, 20, 8))]
    with torch.inference_mode():
        want = _TileNet()(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(np.concatenate(outs), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_the_planner_sizes_the_batch_from_gpu_memory():
    p = plan_execution(_files(), "torch", "cuda")
    assert p.cuda_graphs and p.decode_on_device and p.decode_device == "cuda"
    assert plan.GPU_BATCH_MIN <= p.batch_size <= plan.GPU_BATCH_MAX
    assert p.precision == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_cuda_binds_device_tensors(tiles, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)")
    path = tmp_path / "tilenet.onnx"
    export_graph(_TileNet().eval(), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), path, ("tiles",), ("features",), "n")
    with OnnxRuntimeRunner(path, device="cuda") as runner:
        assert runner.device_inputs
        np.testing.assert_allclose(runner.infer({"tiles": torch.from_numpy(tiles).cuda()})["features"],
                                   runner.infer({"tiles": tiles})["features"], atol=1e-6)
