"""`slidemil score`: fidelity, heatmaps that find the lesion, outputs that line up, resumption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from slidemil.cli import main
from slidemil.engine.score import ScoreConfig, score_slides
from slidemil.runtime.runners import RUNNERS, available_backends
from slidemil.slide.table import SlideEntry, select_shard
from tests.engine_fixtures import lesion_fraction_of_tiles, make_package_and_slides


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package_and_slides(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def scored(package, tmp_path_factory):
    model_dir, slides, _ = package
    out = tmp_path_factory.mktemp("scored")
    score_slides([model_dir], slides, out, ScoreConfig(backend="onnxruntime", device="cpu", top_k=4))
    return out


def test_attention_heatmap_is_highest_on_the_lesion(package, scored):
    _, _, truth = package
    sidecar = json.loads((scored / "heatmaps" / "lesion.json").read_text())
    heat = np.load(scored / "heatmaps" / "lesion.npy")
    cells = np.argwhere(np.isfinite(heat))
    coords = cells[:, ::-1] * sidecar["stride_level0"]
    lesion = lesion_fraction_of_tiles(truth, coords, sidecar["patch_size_level0"]) > 0.3
    assert lesion.sum() >= 3
    assert roc_auc_score(lesion, heat[cells[:, 0], cells[:, 1]]) >= 0.9
    row = pd.read_csv(scored / "predictions.csv").iloc[0]
    assert row.status == "ok" and row.pred_class == "tumour"
    top = pd.read_csv(scored / "topk" / "lesion" / "index.csv")
    top_lesion = lesion_fraction_of_tiles(truth, top[["x", "y"]].to_numpy(), sidecar["patch_size_level0"])
    assert (top_lesion > 0).mean() >= 0.75


def test_heatmap_and_geojson_line_up_with_the_grid(scored):
    sidecar = json.loads((scored / "heatmaps" / "lesion.json").read_text())
    heat = np.load(scored / "heatmaps" / "lesion.npy")
    fc = json.loads((scored / "geojson" / "lesion.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == int(np.isfinite(heat).sum())
    size, stride = sidecar["patch_size_level0"], sidecar["stride_level0"]
    for feature in fc["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        (x, y), (x2, y2) = ring[0], ring[2]
        assert (x2 - x, y2 - y) == (size, size) and x % stride == 0 and y % stride == 0
        m = feature["properties"]["measurements"]
        assert feature["properties"]["objectType"] == "tile"
        assert m["attention"] == pytest.approx(float(heat[y // stride, x // stride]), abs=1e-6)
        assert set(m) >= {"attention", "prob_normal", "prob_tumour"}
    assert (scored / "heatmaps" / "lesion.png").stat().st_size > 1000


def test_onnxruntime_matches_the_torch_path(package, scored, tmp_path):
    model_dir, slides, _ = package
    score_slides([model_dir], slides, tmp_path, ScoreConfig(backend="torch", device="cpu", top_k=0, geojson=False))
    ort = pd.read_csv(scored / "predictions.csv").iloc[0]
    pt = pd.read_csv(tmp_path / "predictions.csv").iloc[0]
    assert abs(ort.prob_tumour - pt.prob_tumour) <= 1e-5 and ort.pred_class == pt.pred_class
    np.testing.assert_allclose(np.load(scored / "heatmaps" / "lesion.npy"), np.load(tmp_path / "heatmaps" / "lesion.npy"),
                               atol=1e-5)


def test_bad_slides_are_rows_and_the_batch_goes_on(package, tmp_path, real_data):
    model_dir, slides, _ = package
    mixed = tmp_path / "slides"
    shutil.copytree(slides, mixed)
    for name in ("unreadable.svs", "unopenable.tiff", "boxes.tiff"):
        shutil.copy(real_data / name, mixed / name)
    out = tmp_path / "out"
    assert main(["score", str(model_dir), str(mixed), "--out", str(out), "--backend", "onnxruntime",
                 "--device", "cpu", "--top-k", "0"]) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert table.loc["lesion", "status"] == "ok"
    assert "unreadable.svs" in table.loc["unreadable", "error"]
    assert "unopenable.tiff" in table.loc["unopenable", "error"]
    assert "--slide-mpp" in table.loc["boxes", "error"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["failures"] == 3 and summary["slides"] == 4


def test_shards_cover_every_slide_once():
    entries = [SlideEntry(f"s{i}", Path(f"s{i}.svs")) for i in range(11)]
    shards = [select_shard(entries, f"{i}/4") for i in range(4)]
    ids = [e.slide_id for shard in shards for e in shard]
    assert sorted(ids) == sorted(e.slide_id for e in entries) and len(ids) == len(set(ids))


def test_killed_run_resumes_to_the_same_outputs(package, tmp_path):
    model_dir, slides, _ = package
    many = tmp_path / "slides"
    many.mkdir()
    for i in range(3):
        shutil.copy(slides / "lesion.svs", many / f"copy{i}.svs")
    args = [sys.executable, "-m", "slidemil", "score", str(model_dir), str(many), "--backend", "onnxruntime",
            "--device", "cpu", "--top-k", "2"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "predictions.csv").is_file():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    subprocess.run(args + ["--out", str(out)], check=True, capture_output=True)
    assert not list(out.rglob(".tmp-*"))
    a = pd.read_csv(ref / "predictions.csv").drop(columns=["seconds", "tiles_per_s"])
    b = pd.read_csv(out / "predictions.csv").drop(columns=["seconds", "tiles_per_s"])
    pd.testing.assert_frame_equal(a.sort_values("slide_id").reset_index(drop=True),
                                  b.sort_values("slide_id").reset_index(drop=True))
    for f in sorted(ref.rglob("*")):
        if f.is_file() and f.suffix in (".npy", ".geojson", ".csv") and f.name != "predictions.csv":
            assert (out / f.relative_to(ref)).read_bytes() == f.read_bytes(), f


def _other_member(model_dir: Path, root: Path) -> Path:
    """A second package of the same backbone, classes and tiling whose head differs from the first's:
    its attention scores are turned around and perturbed (so its normalised attention differs from the
    first's, and not by an affine map) and its classifier is biased towards "normal" (so its
    probabilities differ)."""
    from slidemil.artifacts.checkpoint import load_weights, save_checkpoint
    from slidemil.exporter.export import ExportConfig, export_checkpoint

    run = model_dir.parent / "run"
    shutil.copytree(run / "backbone", root / "run" / "backbone")
    state, meta = load_weights(run / "checkpoint_best")
    g = torch.Generator().manual_seed(5)
    v = state["head.attention_v.weight"]
    state["head.attention_v.weight"] = v + 2 * torch.randn(v.shape, generator=g) * v.std()
    state["head.attention_w.weight"] = -state["head.attention_w.weight"]
    state["head.classifier.bias"] = state["head.classifier.bias"] + torch.tensor([1.0, -1.0])
    meta = {key: value for key, value in meta.items() if key not in ("schema", "slidemil_version", "files")}
    ckpt = save_checkpoint(root / "run" / "checkpoint_best", state, meta)
    export_checkpoint(ckpt, root / "other", ExportConfig())
    return root / "other"


def test_ensemble_averages_members(package, scored, tmp_path):
    model_dir, slides, _ = package
    other = _other_member(model_dir, tmp_path)
    classes = ["normal", "tumour"]
    alone = tmp_path / "other_alone"
    score_slides([other], slides, alone, ScoreConfig(backend="onnxruntime", device="cpu", top_k=0, geojson=False))
    out = tmp_path / "ensemble"
    score_slides([model_dir, other], slides, out, ScoreConfig(backend="onnxruntime", device="cpu", top_k=0,
                                                              geojson=False))
    a = pd.read_csv(scored / "predictions.csv").iloc[0]
    b = pd.read_csv(alone / "predictions.csv").iloc[0]
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    heat_a, heat_b, heat = (np.load(d / "heatmaps" / "lesion.npy") for d in (scored, alone, out))
    # the members really differ, or "the mean" and "the first member" could not be told apart
    assert abs(a.prob_tumour - b.prob_tumour) > 0.2
    assert np.nanmean(np.abs(heat_a - heat_b)) > 0.2
    assert row.status == "ok"
    for c in classes:
        # each member's own columns are its probabilities as scored alone
        assert row[f"{model_dir.name}:prob_{c}"] == pytest.approx(a[f"prob_{c}"], abs=1e-6)
        assert row[f"{other.name}:prob_{c}"] == pytest.approx(b[f"prob_{c}"], abs=1e-6)
        assert row[f"prob_{c}"] == pytest.approx((a[f"prob_{c}"] + b[f"prob_{c}"]) / 2, abs=1e-6), c
    assert row.pred_class == classes[int(np.argmax([a[f"prob_{c}"] + b[f"prob_{c}"] for c in classes]))]
    # the heatmap is the mean of the members' normalised attention, tile by tile
    assert np.array_equal(np.isfinite(heat), np.isfinite(heat_a)) and np.array_equal(np.isfinite(heat_a),
                                                                                   np.isfinite(heat_b))
    np.testing.assert_allclose(heat, (heat_a + heat_b) / 2, atol=1e-6, equal_nan=True)


def test_auto_backend_picks_an_installed_cpu_runner():
    names = available_backends("cpu")
    assert names and all(n in RUNNERS for n in names) and "onnxruntime" in names


def test_openvino_matches_onnxruntime(package, scored, tmp_path):
    pytest.importorskip("openvino")
    model_dir, slides, _ = package
    for precision, tol in (("fp32", 1e-4), ("bf16", 1e-2)):
        out = tmp_path / precision
        score_slides([model_dir], slides, out, ScoreConfig(backend="openvino", device="cpu", precision=precision,
                                                             top_k=0, geojson=False))
        ov = pd.read_csv(out / "predictions.csv").iloc[0]
        ref = pd.read_csv(scored / "predictions.csv").iloc[0]
        assert abs(ov.prob_tumour - ref.prob_tumour) <= tol and ov.pred_class == ref.pred_class



def test_overlapping_heatmap_is_written_over_the_tissue(package, scored, tmp_path):
    model_dir, slides, _ = package
    score_slides([model_dir], slides, tmp_path, ScoreConfig(backend="onnxruntime", device="cpu", top_k=0,
                                                           geojson=False, heatmap_overlap=0.5))
    sidecar = json.loads((tmp_path / "heatmaps" / "lesion.json").read_text())
    dense = np.load(tmp_path / "heatmaps" / "lesion.overlap.npy")
    assert sidecar["overlap_map"]["file"] == "lesion.overlap.npy"
    assert np.nanmin(dense) >= 0.0 and np.nanmax(dense) <= 1.0
    # the overlapping grid covers at least the tissue the model's grid covers
    grid = np.load(scored / "heatmaps" / "lesion.npy")
    rows = ((np.arange(dense.shape[0]) + 0.5) * sidecar["level0_size"][1] / dense.shape[0]
            / sidecar["stride_level0"]).astype(int)
    cols = ((np.arange(dense.shape[1]) + 0.5) * sidecar["level0_size"][0] / dense.shape[1]
            / sidecar["stride_level0"]).astype(int)
    inside = (rows[:, None] < grid.shape[0]) & (cols[None, :] < grid.shape[1])
    on_grid = np.zeros(dense.shape, bool)
    on_grid[inside] = np.isfinite(grid[np.minimum(rows, grid.shape[0] - 1)[:, None],
                                       np.minimum(cols, grid.shape[1] - 1)[None, :]])[inside]
    assert np.isfinite(dense[on_grid]).all()
    # the prediction stays on the model's grid
    a = pd.read_csv(scored / "predictions.csv").iloc[0]
    b = pd.read_csv(tmp_path / "predictions.csv").iloc[0]
    assert a.prob_tumour == pytest.approx(b.prob_tumour, abs=1e-6)
