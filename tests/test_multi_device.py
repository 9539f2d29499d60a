"""Several devices on one node (``--devices``): one worker process per device over a shared slide queue,
tested with CPU workers (``cpu:2``): every slide scored once, outputs identical to one process. Also the
device decoding stages end to end on the CPU (``decode="device"``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.cli import main
from slidemil.engine.score import ScoreConfig, score_slides
from slidemil.errors import ConfigError
from slidemil.runtime.devices import Device, parse_devices
from slidemil.runtime.pipeline import PipelineConfig
from tests.engine_fixtures import make_package_and_slides

TIMING = ["seconds", "tiles_per_s"]


def test_parse_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    four = lambda: 4  # noqa: E731
    assert parse_devices("all", four) == [Device("cuda", str(i), f"cuda-{i}") for i in range(4)]
    assert parse_devices("0,2", four) == [Device("cuda", "0", "cuda-0"), Device("cuda", "2", "cuda-2")]
    assert parse_devices("cuda:3", four) == [Device("cuda", "3", "cuda-3")]
    assert parse_devices("cpu:2", four) == [Device("cpu", None, "cpu-0"), Device("cpu", None, "cpu-1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a Slurm job's GPUs: indices are into this list
    assert [d.visible for d in parse_devices("all", four)] == ["4", "5", "6", "7"]
    assert [d.visible for d in parse_devices("1,3", four)] == ["5", "7"]
    for bad, match in (("all", "no CUDA GPU"), ("4", "GPU 4 does not exist"), ("0,0", "each GPU once"),
                       ("cpu:0", "cpu:N"), ("gpu", "give all")):
        with pytest.raises(ConfigError, match=match):
            parse_devices(bad, (lambda: 0) if bad == "all" else four)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, synth_cohort):
    """A package and five slides: its lesion slide and the synthetic cohort's four."""
    root = tmp_path_factory.mktemp("multi")
    model_dir, slides, _ = make_package_and_slides(root)
    for path in sorted((synth_cohort[0] / "slides").glob("*.svs")):
        shutil.copy(path, slides / path.name)
    return model_dir, slides


CFG = ScoreConfig(backend="torch", device="cpu", threads=1, top_k=2)


@pytest.fixture(scope="module")
def single(cohort, tmp_path_factory):
    model_dir, slides = cohort
    out = tmp_path_factory.mktemp("single")
    score_slides([model_dir], slides, out, CFG)
    return out


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv").drop(columns=TIMING).set_index("slide_id").sort_index()


def _same_outputs(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(_rows(a), _rows(b))
    for sid in _rows(a).index:
        np.testing.assert_array_equal(np.load(a / "heatmaps" / f"{sid}.npy"), np.load(b / "heatmaps" / f"{sid}.npy"))
        assert (a / "geojson" / f"{sid}.geojson").read_text() == (b / "geojson" / f"{sid}.geojson").read_text()
        assert (a / "topk" / sid / "index.csv").read_text() == (b / "topk" / sid / "index.csv").read_text()


def test_cpu_workers_score_every_slide_once_as_one_process_does(cohort, single, tmp_path):
    model_dir, slides = cohort
    out = tmp_path / "out"
    assert main(["score", str(model_dir), str(slides), "--out", str(out), "--backend", "torch", "--device", "cpu",
                 "--threads", "1", "--top-k", "2", "--devices", "cpu:2"]) == 0
    _same_outputs(single, out)
    summary = json.loads((out / "run_summary.json").read_text())
    claimed = [sid for d in summary["devices"] for sid in d["slides"]]
    assert sorted(claimed) == sorted(_rows(single).index) and len(claimed) == len(set(claimed)) == 5
    assert [d["device"] for d in summary["devices"]] == ["cpu-0", "cpu-1"]
    assert summary["scored_this_run"] == 5 and summary["failures"] == 0
    assert summary["total_tiles"] == int(_rows(single)["n_tiles"].sum())
    assert all((out / f"run_summary.cpu-{i}.json").is_file() for i in range(2))
    # a second run finds everything done and starts no slide
    assert main(["score", str(model_dir), str(slides), "--out", str(out), "--backend", "torch", "--device", "cpu",
                 "--threads", "1", "--top-k", "2", "--devices", "cpu:2"]) == 0
    again = json.loads((out / "run_summary.json").read_text())
    assert again["scored_this_run"] == 0 and again["slides"] == 5


def test_decoding_on_the_device_stages_scores_as_the_cpu_path(cohort, single, tmp_path):
    model_dir, slides = cohort
    out = tmp_path / "device"
    summary = score_slides([model_dir], slides, out, ScoreConfig(backend="torch", device="cpu", threads=1, top_k=2,
                                                                  reading=PipelineConfig(decode="device")))
    assert "tiles decoded on the device" in summary["plan"][0]
    _same_outputs(single, out)  # 256-px tiles aligned with the slides' file tiles: the same pixels


def test_extract_on_cpu_workers_equals_one_process(cohort, tmp_path):
    _, slides = cohort
    common = ["extract", str(slides), "--tile", "--backbone", "test_resnet", "--weights", "random",
              "--backend", "torch", "--device", "cpu", "--batch-size", "16"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--devices", "cpu:2"]) == 0
    one = pd.read_csv(tmp_path / "one" / "extraction.csv").set_index("slide_id").sort_index()
    two = pd.read_csv(tmp_path / "two" / "extraction.csv").set_index("slide_id").sort_index()
    assert list(one.index) == list(two.index) and len(one) == 5 and set(two["status"]) == {"ok"}
    assert (one["n_tiles"] == two["n_tiles"]).all()
    for sid in one.index:
        with h5py.File(tmp_path / "one" / "features" / f"{sid}.h5") as a, \
                h5py.File(tmp_path / "two" / "features" / f"{sid}.h5") as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-5, atol=1e-6)


# --- on GPUs ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_all_scores_every_slide_once_on_the_gpus(cohort, single, tmp_path):
    model_dir, slides = cohort
    out = tmp_path / "gpus"
    assert main(["score", str(model_dir), str(slides), "--out", str(out), "--backend", "torch", "--top-k", "2",
                 "--devices", "all"]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    claimed = [sid for d in summary["devices"] for sid in d["slides"]]
    assert sorted(claimed) == sorted(_rows(single).index) and len(claimed) == len(set(claimed))
    assert all("tiles decoded on the device" in d["plan"][0] for d in summary["devices"])
    gpu, cpu = _rows(out), _rows(single)
    prob = [c for c in cpu.columns if c.startswith("prob_")]
    assert (gpu["pred_index"] == cpu["pred_index"]).all()
    assert float((gpu[prob] - cpu[prob]).abs().max().max()) < 2e-2  # bf16 autocast and nvJPEG vs fp32 and libjpeg
