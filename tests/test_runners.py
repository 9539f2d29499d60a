"""Runners: streamed inference in order, asynchronous OpenVINO requests, torch.compile with padding, auto choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slidemil.errors import SlideReadError
from slidemil.models.onnx import export_graph
from slidemil.runtime import plan, runners
from slidemil.runtime.runners import RUNNERS, OnnxRuntimeRunner, TensorMeta, TorchRunner, choose_backend


class _TileNet(nn.Module):
    """uint8 (B, H, W, 3) -> (B, 8): a conv, a ReLU and a mean, each row depending on its own tile."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float() / 255.0
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tile_onnx(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("onnx") / "tilenet.onnx"
    export_graph(_TileNet().eval(), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), path, ("tiles",), ("features",), "n")
    return str(path)


def _batches(tiles: np.ndarray, size: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    return [(i, {"tiles": tiles[i:i + size]}) for i in range(0, len(tiles), size)]


def test_infer_stream_gives_every_batch_in_order(tiles, tile_onnx):
    with OnnxRuntimeRunner(tile_onnx, threads=1) as runner:
        streamed = list(runner.infer_stream(_batches(tiles, 6)))
        assert [k for k, _ in streamed] == [0, 6, 12, 18]
        np.testing.assert_array_equal(np.concatenate([o["features"] for _, o in streamed]),
                                      runner.infer({"tiles": tiles})["features"])


def test_openvino_async_stream_equals_synchronous_inference(tiles, tile_onnx):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from slidemil.runtime.openvino_runner import OpenVinoRunner
    with OpenVinoRunner(tile_onnx, precision="fp32", threads=1, use_cache=False) as runner, \
            OnnxRuntimeRunner(tile_onnx, threads=1) as reference:
        expected = reference.infer({"tiles": tiles})["features"]
        streamed = list(runner.infer_stream(_batches(tiles, 3)))  # 7 batches through 2 requests
        assert [k for k, _ in streamed] == list(range(0, 20, 3))
        # every batch has its own outputs (no request buffer handed out twice)
        np.testing.assert_allclose(np.concatenate([o["features"] for _, o in streamed]), expected, atol=1e-5)


def test_openvino_stream_passes_a_read_error_on_after_finishing_its_requests(tiles, tile_onnx):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from slidemil.runtime.openvino_runner import OpenVinoRunner

    def feeds():
        yield 0, {"tiles": tiles[:4]}
        yield 4, {"tiles": tiles[4:8]}
        raise SlideReadError("tile 8 is corrupt")

    with OpenVinoRunner(tile_onnx, precision="fp32", threads=1, use_cache=False) as runner:
        got = []
        with pytest.raises(SlideReadError, match="corrupt"):
            for key, _ in runner.infer_stream(feeds()):
                got.append(key)
        assert got == []  # the error came while both requests were in flight
        # the runner is usable afterwards: both requests were waited for
        again = [k for k, _ in runner.infer_stream(_batches(tiles, 10))]
        assert again == [0, 10]


def tile_inputs(tiles: np.ndarray) -> dict[str, TensorMeta]:
    return {"tiles": TensorMeta("uint8", (None, *tiles.shape[1:]))}


def test_compiled_torch_runner_pads_partial_batches_and_matches_eager(tiles):
    module = _TileNet().eval()
    with torch.inference_mode():
        eager = module(torch.from_numpy(tiles)).numpy()
    with TorchRunner(module, tile_inputs(tiles), ["features"], precision="fp32", channels_last=False,
                     compile=True) as runner:
        outs = [out["features"] for _, out in runner.infer_stream(_batches(tiles, 8))]  # 8, 8 and a partial 4
    assert [len(o) for o in outs] == [8, 8, 4]
    np.testing.assert_allclose(np.concatenate(outs), eager, rtol=1e-4, atol=1e-5)
    assert "compiled" in runner.describe()


def test_torch_compile_failing_to_build_falls_back_to_eager(tiles, monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no working C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    module = _TileNet().eval()
    with TorchRunner(module, tile_inputs(tiles), ["features"], precision="fp32", channels_last=False,
                     compile=True) as runner:
        out = runner.infer({"tiles": tiles[:5]})["features"]
    with torch.inference_mode():
        np.testing.assert_allclose(out, module(torch.from_numpy(tiles[:5])).numpy(), rtol=1e-6)
    assert "running eagerly" in caplog.text and "compiled" not in runner.describe()


@pytest.mark.parametrize("precision, has_cxx, expected", [("bf16", True, True), ("fp32", True, False),
                                                          ("bf16", False, False)])
def test_auto_compiles_bf16_on_the_cpu_where_a_compiler_exists(precision, has_cxx, expected, monkeypatch):
    monkeypatch.setattr(plan, "has_cxx_compiler", lambda: has_cxx)
    assert plan.resolve_compile("auto", "cpu", "torch", precision) is expected
    assert plan.resolve_compile("auto", "cpu", "openvino", precision) is False
    assert plan.resolve_compile("on", "cuda", "torch", "fp32") is True


def test_auto_picks_the_fastest_installed_cpu_runner(monkeypatch):
    runners._load_optional_runners()
    if "openvino" in RUNNERS and RUNNERS["openvino"].available("cpu"):
        assert choose_backend("auto", "cpu") == "openvino"
    monkeypatch.setattr(RUNNERS["openvino"], "available", classmethod(lambda cls, device: False))
    assert choose_backend("auto", "cpu") == "onnxruntime"


def test_backbone_features_refuses_a_stream_that_stopped_early(tiles, tile_onnx):
    from types import SimpleNamespace

    from slidemil.runtime.pipeline import backbone_features
    short = SimpleNamespace(entry=SimpleNamespace(slide_id="s1"), n_tiles=20,
                            batches=lambda: iter([(0, tiles[:8]), (8, tiles[8:16])]))  # 4 tiles never came
    with OnnxRuntimeRunner(tile_onnx, threads=1) as runner:
        with pytest.raises(SlideReadError, match="16 of 20 tiles"):
            backbone_features(short, [runner], [8])
        whole = SimpleNamespace(entry=short.entry, n_tiles=20, batches=lambda: iter([(0, tiles[:12]), (12, tiles[12:])]))
        twin = OnnxRuntimeRunner(tile_onnx, threads=1).activate()  # an ensemble of two members sees every batch
        a, b = backbone_features(whole, [runner, twin], [8, 8])
        twin.deactivate()
        np.testing.assert_array_equal(a, runner.infer({"tiles": tiles})["features"])
        np.testing.assert_array_equal(a, b)


def test_openvino_uses_one_stream_on_few_cores_and_several_on_many(tile_onnx):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from slidemil.runtime.openvino_runner import OpenVinoRunner, performance_hint
    assert [performance_hint(n) for n in (1, 2, 4, 8, 64)] == ["LATENCY"] * 3 + ["THROUGHPUT"] * 2
    with OpenVinoRunner(tile_onnx, precision="fp32", threads=2, use_cache=False) as runner:
        assert runner.streams == 1 and len(runner._requests) >= 2  # still two requests in flight
