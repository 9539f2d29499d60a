"""bench/score.py without a GPU: runner specs, the runners chosen for --device cuda, what the package needs."""

from __future__ import annotations

import argparse
import re

import pytest

from tests.bench_modules import bench_module


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    """bench/score.py as a module (bench/ is not a package); it changes nothing at import."""
    with bench_module("score") as module:
        yield module


def env(bench, **changes):  # type: ignore[no-untyped-def]
    """A GPU machine with torch CUDA, onnxruntime-gpu, OpenVINO, NNCF and TensorRT, with ``changes``."""
    base = {"cuda": True, "onnxruntime": ("CUDAExecutionProvider", "CPUExecutionProvider"), "openvino": True,
            "nncf": True, "tensorrt": None}
    return bench.Environment(**{**base, **changes})


NO_TRT = "TensorRT is not installed: pip install tensorrt"


def texts(specs) -> list[str]:  # type: ignore[no-untyped-def]
    return [s.text for s in specs]


def test_runner_specs_parse_or_say_what_is_allowed(bench) -> None:  # type: ignore[no-untyped-def]
    assert bench.parse_runner("torch:bf16") == bench.RunnerSpec("torch", "bf16", "off")
    assert bench.parse_runner("torch:fp16:on") == bench.RunnerSpec("torch", "fp16", "on")
    assert bench.parse_runner("tensorrt") == bench.RunnerSpec("tensorrt", "auto", "off")
    assert bench.parse_runner("onnxruntime:fp16").text == "onnxruntime:fp16"
    for bad, why in (("foo:fp32", "unknown backend"), ("onnxruntime:bf16", "not bf16"),
                     ("tensorrt:int8", "not int8"), ("onnxruntime:fp32:on", "backend[:precision]"),
                     ("torch:fp32:maybe", "on, off or auto"), ("torch:fp32:off:x", "torch-compile")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
            bench.parse_runner(bad)
    for text in [t for defaults in bench.DEFAULT_RUNNERS.values() for t in defaults]:  # valid, and written in full
        assert bench.parse_runner(text).text == text


def test_command_line(bench, capsys) -> None:  # type: ignore[no-untyped-def]
    args = bench.build_parser().parse_args(["--device", "cuda"])
    assert args.device == "cuda" and args.runners is None
    args = bench.build_parser().parse_args(["--runners", "onnxruntime:fp16", "torch:bf16", "--device", "cuda"])
    assert texts(args.runners) == ["onnxruntime:fp16", "torch:bf16:off"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--runners", "onnxruntime:bf16"])
    assert "onnxruntime runs at auto, fp32, fp16, not bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--backend", "tensorrt"])  # gone: --runners tensorrt:fp16


def test_cuda_defaults_follow_what_is_installed(bench) -> None:  # type: ignore[no-untyped-def]
    # torch CUDA only: the torch runners, nothing that needs fp16 graphs or engines
    specs, left_out = bench.default_runners("cuda", env(bench, onnxruntime=("CPUExecutionProvider",), tensorrt=NO_TRT))
    assert texts(specs) == ["torch:fp16:off", "torch:bf16:off", "torch:fp32:off"]
    assert set(left_out) == {"tensorrt:fp16", "onnxruntime:fp16"}
    assert NO_TRT in left_out["tensorrt:fp16"] and "onnxruntime-gpu" in left_out["onnxruntime:fp16"]
    cfg = bench.export_config(specs, "cuda")
    assert not cfg.fp16 and not cfg.tensorrt
    # onnxruntime-gpu too: its fp16 runner, and the package gets fp16 graphs
    specs, _ = bench.default_runners("cuda", env(bench, tensorrt=NO_TRT))
    assert texts(specs) == ["onnxruntime:fp16", "torch:fp16:off", "torch:bf16:off", "torch:fp32:off"]
    cfg = bench.export_config(specs, "cuda")
    assert cfg.fp16 and not cfg.tensorrt
    # and TensorRT: fp16 engines are built at export
    specs, left_out = bench.default_runners("cuda", env(bench))
    assert texts(specs) == ["tensorrt:fp16", "onnxruntime:fp16", "torch:fp16:off", "torch:bf16:off",
                            "torch:fp32:off"] and not left_out
    cfg = bench.export_config(specs, "cuda")
    assert cfg.fp16 and cfg.tensorrt and cfg.trt_precisions == ("fp16",)
    assert bench.choose_runners(None, "cuda", env(bench)) == specs


def test_cpu_defaults(bench) -> None:  # type: ignore[no-untyped-def]
    specs, left_out = bench.default_runners("cpu", env(bench, cuda=False, nncf=False))
    assert texts(specs) == ["openvino:bf16", "onnxruntime:fp32", "torch:fp32:off", "torch:bf16:off", "torch:bf16:on"]
    assert "nncf" in left_out["openvino:int8"] or "quantize" in left_out["openvino:int8"]
    cfg = bench.export_config(specs, "cpu")
    assert not cfg.fp16 and not cfg.tensorrt
    # this machine, as it is: the CPU defaults hold ONNX Runtime and torch fp32
    here = bench.choose_runners(None, "cpu", bench.detect_environment())
    assert {"onnxruntime:fp32", "torch:fp32:off"} <= set(texts(here))


def test_runners_that_cannot_run_stop_the_bench_with_the_reason(bench) -> None:  # type: ignore[no-untyped-def]
    parse = bench.parse_runner
    no_gpu = env(bench, cuda=False, onnxruntime=("CPUExecutionProvider",),
                 tensorrt="TensorRT needs an NVIDIA GPU and torch sees none here")
    with pytest.raises(SystemExit, match=r"no runner can run on cuda(.|\n)*torch sees no CUDA GPU"):
        bench.choose_runners(None, "cuda", no_gpu)
    with pytest.raises(SystemExit, match=r"tensorrt:fp16: TensorRT is not installed"):
        bench.choose_runners([parse("torch:fp16"), parse("tensorrt:fp16")], "cuda", env(bench, tensorrt=NO_TRT))
    with pytest.raises(SystemExit, match=r"onnxruntime:fp16: ONNX Runtime has no CUDA provider(.|\n)*onnxruntime-gpu"):
        bench.choose_runners([parse("onnxruntime:fp16")], "cuda", env(bench, onnxruntime=("CPUExecutionProvider",)))
    with pytest.raises(SystemExit, match="onnxruntime is not installed"):
        bench.choose_runners([parse("onnxruntime:fp32")], "cpu", env(bench, onnxruntime=None))
    with pytest.raises(SystemExit, match="OpenVINO on the CPU only"):
        bench.choose_runners([parse("openvino:bf16")], "cuda", env(bench))
    with pytest.raises(SystemExit, match="TensorRT runs on CUDA GPUs only"):
        bench.choose_runners([parse("tensorrt:fp16")], "cpu", env(bench))
    with pytest.raises(SystemExit, match="NNCF"):
        bench.choose_runners([parse("openvino:int8")], "cpu", env(bench, nncf=False))
    asked = [parse("torch:bf16"), parse("onnxruntime:fp16")]
    assert bench.choose_runners(asked, "cuda", env(bench, tensorrt=NO_TRT)) == asked


def test_export_gives_each_requested_runner_its_files(bench) -> None:  # type: ignore[no-untyped-def]
    parse = bench.parse_runner
    assert bench.export_config([parse("onnxruntime:fp16")], "cpu").fp16  # fp16 graphs on the CPU when asked
    assert bench.export_config([parse("onnxruntime")], "cuda").fp16  # auto takes fp16 graphs on a GPU
    assert not bench.export_config([parse("onnxruntime"), parse("torch:fp16")], "cpu").fp16
    cfg = bench.export_config([parse("tensorrt:fp32"), parse("tensorrt")], "cuda")
    assert cfg.tensorrt and cfg.trt_precisions == ("fp16", "fp32") and cfg.overwrite
