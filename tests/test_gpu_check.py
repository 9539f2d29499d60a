"""bench/gpu_check.py without a GPU: what it makes of a runner's GPU trace and of the issue's targets (the
dry run of the whole check is ``bash bench/gpu_check.sh OUT --dry-run``)."""

from __future__ import annotations

import json

import pytest

from tests.bench_modules import bench_module


@pytest.fixture(scope="module")
def check():  # type: ignore[no-untyped-def]
    with bench_module("gpu_check") as module:
        yield module


def test_trace_gives_busy_time_and_the_gaps_between_slides(check, tmp_path):  # type: ignore[no-untyped-def]
    # warm-up, then slide A (two full batches, a partial one), a 30 ms gap, slide B: 10 ms per full batch
    batches = [[0.0, 500.0, 512], [900.0, 910.0, 512], [910.5, 920.5, 512], [921.0, 924.0, 100],
               [954.0, 964.0, 512], [964.2, 967.0, 50]]
    head = {"runner": "torch (cuda, features)", "inputs": ["features"], "batches": [[0, 1, 3]] * 4}
    tiles = {"runner": "torch (cuda:0, bf16, CUDA graphs)", "inputs": ["tiles"], "batches": batches,
             "peak_gpu_mb": 2048.0}
    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps(head) + "\n" + json.dumps(tiles) + "\n")
    got = check.analyse_trace(path)
    assert got["batches"] == 5 and got["batch_size"] == 512 and got["median_batch_ms"] == 10.0
    assert got["max_gap_ms"] == 30.0 and got["max_gap_between_slides_ms"] == 30.0 and got["slide_boundaries"] == 1
    assert got["gaps_longer_than_a_batch"] == 1
    assert got["gpu_busy_fraction"] == pytest.approx((10 + 10 + 3 + 10 + 2.8) / 67.0, abs=1e-4)
    assert check.analyse_trace(tmp_path / "absent.jsonl") is None


def test_targets_are_judged_from_the_steps(check):  # type: ignore[no-untyped-def]
    report = {"steps": {
        "resnet50_trunc": {"end_to_end": {"tiles_per_s": 10500.0, "efficiency": 0.93,
                                          "trace": {"max_gap_between_slides_ms": 12.0, "median_batch_ms": 40.0}}},
        "vit_large": {"end_to_end": {"efficiency": 0.85}}}}
    met = {name: t["met"] for name, t in check.targets(report).items()}
    assert met == {"resnet50_trunc end-to-end tiles/s >= 10000": True, "resnet50_trunc efficiency >= 0.9": True,
                   "vit_large end-to-end / model-only >= 0.9": False,
                   "max GPU idle gap between slides <= one batch (ms)": True}
    assert all(t["met"] is None for t in check.targets({"steps": {}}).values())  # not measured: not judged


def test_report_json_is_strict(check):  # type: ignore[no-untyped-def]
    assert check.finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None],
                                                                                     "c": "x"}
