"""`slidemil heatmap`: score's outputs from stored features, the head alone, and a smooth map from the grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from slidemil.engine.heatmap import COLORBAR_PX, TITLE_PX
from slidemil.engine.heatmap_from_features import HeatmapConfig, feature_files, heatmaps_from_features
from slidemil.engine.score import ScoreConfig, score_slides
from slidemil.engine.smooth_heatmap import smooth_attention_map
from slidemil.features.extract import ExtractConfig, extract_features
from slidemil.slide.grid import grid_from_coords
from slidemil.slide.readers import open_slide
from slidemil.slide.tissue import TissueConfig, detect_tissue
from tests.engine_fixtures import make_package_and_slides


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One package, its slide scored by `score`, the same slide's features, and `heatmap` from them."""
    root = tmp_path_factory.mktemp("hff")
    model, slides, _ = make_package_and_slides(root)
    extract_features(slides, root / "feat", ExtractConfig(checkpoint=str(root / "run" / "checkpoint_best"),
                                                          backend="onnxruntime", device="cpu"))
    score_slides([model], slides, root / "scored", ScoreConfig(backend="onnxruntime", device="cpu", top_k=4))
    summary = heatmaps_from_features(root / "feat", model, root / "hm", HeatmapConfig(top_k=4), slides=slides)
    return {"root": root, "model": model, "slides": slides, "scored": root / "scored", "hm": root / "hm",
            "feat": root / "feat", "summary": summary}


def probs(out: Path) -> pd.Series:
    return pd.read_csv(out / "predictions.csv").set_index("slide_id").loc["lesion"]


def geojson_measure(out: Path, key: str) -> np.ndarray:
    fc = json.loads((out / "geojson" / "lesion.geojson").read_text())
    return np.array([f["properties"]["measurements"][key] for f in fc["features"]], dtype=np.float64)


def test_reproduces_scores_probabilities_and_attention(runs):
    a, b = probs(runs["scored"]), probs(runs["hm"])
    assert a.status == b.status == "ok" and a.pred_class == b.pred_class and a.n_tiles == b.n_tiles
    for c in ("prob_normal", "prob_tumour"):
        assert abs(a[c] - b[c]) <= 1e-6
    ha, hb = np.load(runs["scored"] / "heatmaps" / "lesion.npy"), np.load(runs["hm"] / "heatmaps" / "lesion.npy")
    assert np.array_equal(np.isfinite(ha), np.isfinite(hb))
    np.testing.assert_allclose(ha, hb, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(geojson_measure(runs["scored"], "attention_raw"),
                               geojson_measure(runs["hm"], "attention_raw"), atol=1e-6)
    ta = pd.read_csv(runs["scored"] / "topk" / "lesion" / "index.csv")
    tb = pd.read_csv(runs["hm"] / "topk" / "lesion" / "index.csv")
    assert ta[["x", "y"]].equals(tb[["x", "y"]])
    for name in ta.file:  # the same pixels, cut from the slide
        assert np.array_equal(cv2.imread(str(runs["scored"] / "topk" / "lesion" / name)),
                              cv2.imread(str(runs["hm"] / "topk" / "lesion" / name)))


def test_writes_scores_files_and_the_viewer_files(runs):
    scored = {p.relative_to(runs["scored"]).as_posix() for p in runs["scored"].rglob("*") if p.is_file()}
    drawn = {p.relative_to(runs["hm"]).as_posix() for p in runs["hm"].rglob("*") if p.is_file()}
    per_slide = {p for p in scored if p.startswith(("heatmaps/", "geojson/", "topk/"))}
    assert per_slide <= drawn
    assert {"heatmaps/lesion.overlap.npy", "heatmaps/lesion.ome.tif", "geojson/lesion.annotations.geojson",
            "heatmap_config.json", "run_summary.json", "predictions.csv"} <= drawn
    sa = json.loads((runs["scored"] / "heatmaps" / "lesion.json").read_text())
    sb = json.loads((runs["hm"] / "heatmaps" / "lesion.json").read_text())
    assert "not an overlapping grid" in sb.pop("overlap_map")["method"]
    assert sa == sb
    png_a = cv2.imread(str(runs["scored"] / "heatmaps" / "lesion.png"))
    png_b = cv2.imread(str(runs["hm"] / "heatmaps" / "lesion.png"))
    assert png_a.shape == png_b.shape  # the same thumbnail, from the slide
    assert runs["summary"]["failures"] == 0 and runs["summary"]["scored_this_run"] == 1


def test_smooth_map_covers_tissue_only_at_thumbnail_resolution(runs):
    smooth = np.load(runs["hm"] / "heatmaps" / "lesion.overlap.npy")
    grid_map = np.load(runs["hm"] / "heatmaps" / "lesion.npy")
    png = cv2.imread(str(runs["hm"] / "heatmaps" / "lesion.png"))
    assert smooth.shape == (png.shape[0] - TITLE_PX, png.shape[1] - COLORBAR_PX)  # the thumbnail's, not level 0
    with open_slide(runs["slides"] / "lesion.svs") as reader:
        tissue, _ = detect_tissue(reader, TissueConfig())
    finite = np.isfinite(smooth)
    assert tissue.mask.shape == smooth.shape and not (finite & ~tissue.mask).any()
    assert finite.mean() > 0.2 and (tissue.mask & ~finite).mean() < 0.1
    lo, hi = np.nanmin(grid_map), np.nanmax(grid_map)
    assert lo - 1e-6 <= np.nanmin(smooth) and np.nanmax(smooth) <= hi + 1e-6
    assert len(np.unique(smooth[finite])) > 20 * np.isfinite(grid_map).sum()  # not blocky squares


def test_without_the_slide_file_draws_on_a_blank_canvas(runs, tmp_path):
    summary = heatmaps_from_features(runs["feat"] / "features", runs["model"], tmp_path, HeatmapConfig(top_k=4))
    assert summary["failures"] == 0
    assert abs(probs(tmp_path).prob_tumour - probs(runs["scored"]).prob_tumour) <= 1e-6
    assert not (tmp_path / "topk" / "lesion").exists()  # no pixels to cut tiles from
    png = cv2.imread(str(tmp_path / "heatmaps" / "lesion.png"))
    smooth = np.load(tmp_path / "heatmaps" / "lesion.overlap.npy")
    assert smooth.shape == (png.shape[0] - TITLE_PX, png.shape[1] - COLORBAR_PX)
    assert np.isfinite(smooth).any() and not np.isfinite(smooth).all()
    assert (tmp_path / "heatmaps" / "lesion.ome.tif").is_file()
    again = heatmaps_from_features(runs["feat"], runs["model"], tmp_path, HeatmapConfig(top_k=4))
    assert again["scored_this_run"] == 0  # resumes: complete slides are skipped


def test_a_checkpoints_head_gives_the_packages_numbers(runs, tmp_path):
    heatmaps_from_features(runs["feat"], runs["root"] / "run" / "checkpoint_best", tmp_path,
                           HeatmapConfig(top_k=0, viewer_files=False, smooth=False))
    assert abs(probs(tmp_path).prob_tumour - probs(runs["scored"]).prob_tumour) <= 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "heatmaps" / "lesion.npy"),
                               np.load(runs["scored"] / "heatmaps" / "lesion.npy"), atol=1e-5, equal_nan=True)


def test_features_of_another_backbone_or_width_are_refused(runs, tmp_path):
    source = feature_files(runs["feat"])[0]
    other = tmp_path / "feat"
    other.mkdir()
    shutil.copy(source, other / "lesion.h5")
    with h5py.File(other / "lesion.h5", "r+") as f:
        f["features"].attrs["weights_sha256"] = "0" * 64
    heatmaps_from_features(other, runs["model"], tmp_path / "a", HeatmapConfig(top_k=0))
    row = probs(tmp_path / "a")
    assert row.status == "error" and "backbone weights" in row.error
    with h5py.File(other / "lesion.h5", "r+") as f:
        feats = f["features"][()]
        del f["features"]
        f.create_dataset("features", data=feats[:, :10])
    heatmaps_from_features(other, runs["model"], tmp_path / "b", HeatmapConfig(top_k=0))
    row = probs(tmp_path / "b")
    assert row.status == "error" and "10-d" in row.error


def _grid(cells: list[tuple[int, int]], step: int = 100):
    coords = np.array([[c * step, r * step] for r, c in cells], dtype=np.int64)
    return grid_from_coords(coords, step, step, (8 * step, 6 * step), 0.5)


def test_smooth_map_is_constant_on_a_constant_grid_and_peaks_on_a_hot_tile():
    cells = [(r, c) for r in range(1, 5) for c in range(1, 7)]
    grid = _grid(cells)
    flat = smooth_attention_map(grid, np.full(len(cells), 0.25, np.float32), (60, 80))
    assert np.allclose(flat[np.isfinite(flat)], 0.25, atol=1e-6)
    hot = np.zeros(len(cells), np.float32)
    hot[cells.index((2, 3))] = 1.0
    m = smooth_attention_map(grid, hot, (60, 80), sigma=0.5)
    peak = np.unravel_index(np.nanargmax(m), m.shape)
    assert abs(peak[0] - 25) <= 1 and abs(peak[1] - 35) <= 1  # tile (2, 3) spans pixels 20-30 x 30-40
    row = m[25, 35:60]
    assert np.all(np.diff(row[np.isfinite(row)]) <= 1e-6)  # decays away from it
    assert np.isnan(m[0, 0]) and np.isnan(m[59, 79])  # no tile within reach


def test_smooth_map_does_not_depend_on_the_band_size():
    rng = np.random.default_rng(0)
    cells = [(r, c) for r in range(6) for c in range(8) if rng.random() < 0.7]
    grid = _grid(cells)
    values = rng.random(len(cells)).astype(np.float32)
    tissue = rng.random((12, 16)) < 0.9
    a = smooth_attention_map(grid, values, (61, 83), tissue=tissue, band_rows=7)
    b = smooth_attention_map(grid, values, (61, 83), tissue=tissue, band_rows=1000)
    np.testing.assert_array_equal(a, b)


def test_the_cli_draws_from_features_and_the_score_files_are_there(runs, tmp_path):
    from slidemil.cli import main
    assert main(["heatmap", str(runs["feat"]), "--model", str(runs["model"]), "--out", str(tmp_path),
                 "--slides", str(runs["slides"]), "--top-k", "2", "--no-smooth"]) == 0
    assert abs(probs(tmp_path).prob_tumour - probs(runs["scored"]).prob_tumour) <= 1e-6
    assert len(pd.read_csv(tmp_path / "topk" / "lesion" / "index.csv")) == 2
    assert not (tmp_path / "heatmaps" / "lesion.overlap.npy").exists()
    scored = {p.relative_to(runs["scored"]).as_posix() for p in runs["scored"].rglob("*") if p.is_file()}
    drawn = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    per_slide = {f for f in scored if f.startswith(("heatmaps/", "geojson/"))}
    assert per_slide <= drawn  # the same heatmap, GeoJSON and viewer files as score writes
