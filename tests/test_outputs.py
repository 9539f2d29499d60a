"""Scoring outputs: attention normalisation, heatmap grids and images, GeoJSON, top-k, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from slidemil.engine.heatmap import (
    ATTENTION_NORMS,
    TITLE_PX,
    attention_grid,
    grid_sidecar,
    grid_to_pixels,
    normalize_attention,
    overlap_heatmap,
    overlay_png,
)
from slidemil.engine.outputs import (
    PredictionsTable,
    geojson_tiles,
    outputs_complete,
    slide_paths,
    topk_indices,
    write_geojson,
    write_heatmap,
    write_run_summary,
    write_topk,
)
from slidemil.errors import ConfigError
from slidemil.slide.grid import TileGrid, grid_from_coords

CLASSES = ["normal", "tumor"]


def small_grid() -> TileGrid:
    """A 4 x 5 grid of 100 px tiles on a 520 x 430 slide; tissue on 7 cells."""
    coords = np.array([[100, 0], [200, 0], [0, 100], [100, 100], [200, 100], [300, 200], [400, 300]])
    return grid_from_coords(coords, size_level0=100, stride_level0=100, level0_size=(520, 430), slide_mpp=0.5)


# --- normalisation ---------------------------------------------------------------------------------


def test_percentile_ranks_by_hand():
    np.testing.assert_allclose(normalize_attention(np.array([3.0, 1.0, 2.0]), "percentile"), [1.0, 1 / 3, 2 / 3],
                               rtol=1e-6)
    # ties share the average rank: ranks 1, 2.5, 2.5, 4 over 4 tiles
    np.testing.assert_allclose(normalize_attention(np.array([0.0, 5.0, 5.0, 9.0]), "percentile"),
                               [0.25, 0.625, 0.625, 1.0], rtol=1e-6)


def test_minmax_softmax_raw_by_hand():
    np.testing.assert_allclose(normalize_attention(np.array([2.0, 4.0, 3.0]), "minmax"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalize_attention(np.array([7.0, 7.0]), "minmax"), [0.5, 0.5])
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(normalize_attention(np.array([0.0, 1.0, 2.0]), "softmax"), e / e.sum(), rtol=1e-6)
    out = normalize_attention(np.array([-1.5, 2.25]), "raw")
    assert out.dtype == np.float32 and out.tolist() == [-1.5, 2.25]
    for name in ATTENTION_NORMS:
        assert normalize_attention(np.zeros(0), name).shape == (0,)


def test_unknown_norm_and_bad_input():
    with pytest.raises(ConfigError, match="percentile"):
        normalize_attention(np.ones(3), "zscore")
    with pytest.raises(ValueError):
        normalize_attention(np.array([1.0, np.nan]), "minmax")


# --- grids and maps --------------------------------------------------------------------------------


def test_attention_grid_nan_off_tissue_and_sidecar():
    grid = small_grid()
    values = np.arange(1, len(grid) + 1, dtype=np.float32)
    g = attention_grid(grid, values)
    assert g.shape == (4, 5) and g.dtype == np.float32
    finite = np.argwhere(np.isfinite(g))
    assert sorted(map(tuple, finite.tolist())) == sorted(map(tuple, (grid.coords[:, ::-1] // 100).tolist()))
    np.testing.assert_array_equal(g[grid.coords[:, 1] // 100, grid.coords[:, 0] // 100], values)
    side = grid_sidecar(grid, "percentile")
    assert side["origin_level0"] == [0, 0] and side["stride_level0"] == 100 and side["shape"] == [4, 5]
    assert side["attention_norm"] == "percentile" and side["level0_size"] == [520, 430]
    json.dumps(side)


def test_overlap_map_two_tiles_by_hand():
    # slide 8 x 8 level-0 px, map 8 x 8: tile A (0,0) size 4 value 1, tile B (2,2) size 4 value 3
    m = overlap_heatmap((8, 8), np.array([[0, 0], [2, 2]]), 4, np.array([1.0, 3.0]), (8, 8))
    expect = np.full((8, 8), np.nan, np.float32)
    expect[0:4, 0:4] = 1.0
    expect[2:6, 2:6] = 3.0
    expect[2:4, 2:4] = 2.0  # covered by both: mean
    np.testing.assert_array_equal(m, expect)
    # at half resolution every footprint halves
    half = overlap_heatmap((8, 8), np.array([[0, 0], [2, 2]]), 4, np.array([1.0, 3.0]), (4, 4))
    assert half[1, 1] == 2.0 and half[0, 0] == 1.0 and half[2, 2] == 3.0 and np.isnan(half[3, 3])


def test_overlap_map_handles_100k_tiles():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 200_000, size=(100_000, 2))
    values = rng.random(100_000).astype(np.float32)
    m = overlap_heatmap((200_512, 200_512), coords, 512, values, (2000, 2000))
    assert m.shape == (2000, 2000) and np.nanmax(m) <= values.max() and np.nanmin(m) >= values.min()
    # a pixel under exactly one tile carries that tile's value
    i = int(np.argmax(values))
    cx, cy = (coords[i] + 256) * 2000 // 200_512
    covering = np.all((coords <= (np.array([cx, cy]) + 0.5) * 200_512 / 2000) &
                      (coords + 512 > (np.array([cx, cy]) + 0.5) * 200_512 / 2000), axis=1)
    assert m[cy, cx] == pytest.approx(float(values[covering].mean()), rel=1e-5)


def test_grid_to_pixels_aligns_with_tiles():
    grid = small_grid()
    g = attention_grid(grid, np.arange(len(grid), dtype=np.float32))
    px = grid_to_pixels(grid, g, (43, 52))  # 10 level-0 px per map pixel
    assert px[5, 15] == 0.0 and px[35, 45] == 6.0  # tile 0 at x 100-200, y 0-100; tile 6 at (400, 300)
    assert np.isnan(px[:, 50:]).all() and np.isnan(px[40:, :]).all()  # margins beyond the grid


# --- overlay ---------------------------------------------------------------------------------------


def test_overlay_differs_from_thumbnail_only_on_tissue():
    rng = np.random.default_rng(1)
    thumb = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    values = np.full((6, 8), np.nan, np.float32)
    values[1:3, 2:5] = [[0.0, 0.5, 1.0], [0.2, 0.4, 0.9]]
    img = overlay_png(thumb, values, "tumor 0.93", label="attention (percentile)")
    h, w = thumb.shape[:2]
    assert img.dtype == np.uint8 and img.shape[0] == TITLE_PX + h and img.shape[1] > w
    body = img[TITLE_PX:, :w]
    tissue = cv2.resize(np.isfinite(values).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    np.testing.assert_array_equal(body[~tissue], thumb[~tissue])
    assert (body[tissue] != thumb[tissue]).any(axis=-1).mean() > 0.9
    assert (img[:TITLE_PX] < 128).any()  # title text drawn
    assert len(np.unique(img[TITLE_PX:, w:].reshape(-1, 3), axis=0)) > 20  # colour bar drawn


# --- writers ---------------------------------------------------------------------------------------


def test_write_heatmap_files(tmp_path: Path):
    grid = small_grid()
    values = normalize_attention(np.arange(len(grid), dtype=np.float64))
    thumb = np.full((43, 52, 3), 200, np.uint8)
    written = write_heatmap(tmp_path, "s1", grid, values, "percentile", thumb, "tumor 0.9")
    arr = np.load(written["npy"])
    assert arr.dtype == np.float32 and arr.shape == grid.shape
    assert np.isfinite(arr).sum() == len(grid)
    np.testing.assert_array_equal(arr[grid.cells[:, 0], grid.cells[:, 1]], values)
    assert json.loads(written["sidecar"].read_text())["attention_norm"] == "percentile"
    png = cv2.imread(str(written["png"]))
    assert png.shape[0] == TITLE_PX + 43
    assert not list(tmp_path.rglob(".tmp-*"))
    assert outputs_complete(tmp_path, "s1", want_geojson=False)
    assert not outputs_complete(tmp_path, "s1", want_geojson=True)
    assert not outputs_complete(tmp_path, "s1", want_geojson=False, want_overlap=True)
    overlap = overlap_heatmap(grid.level0_size, grid.coords, 100, values, (43, 52))
    write_heatmap(tmp_path, "s1", grid, values, "percentile", thumb, "t", overlap_map=overlap)
    assert outputs_complete(tmp_path, "s1", want_geojson=False, want_overlap=True)


def validate_feature_collection(fc: dict) -> None:
    """Structural GeoJSON check (RFC 7946 subset used here) plus QuPath's tile properties."""
    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list)
    for f in fc["features"]:
        assert f["type"] == "Feature"
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert all(len(p) == 2 and all(isinstance(c, (int, float)) for c in p) for p in ring)
        props = f["properties"]
        assert props["objectType"] == "tile" and isinstance(props["name"], str)
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in props["measurements"].values())


def test_geojson_polygons_line_up_and_validate(tmp_path: Path):
    grid = small_grid()
    raw = np.linspace(-1, 1, len(grid))
    att = normalize_attention(raw)
    fc = geojson_tiles(grid, att, "percentile", CLASSES, np.array([0.25, 0.75]), extra={"attention_raw": raw},
                       classification="tumor")
    path = tmp_path / "geojson" / "s1.geojson"
    write_geojson(path, fc)
    back = json.loads(path.read_text())
    validate_feature_collection(back)
    assert len(back["features"]) == len(grid) and back["slidemil"]["attention_norm"] == "percentile"
    s = grid.patch_size_level0
    for i, f in enumerate(back["features"]):
        x, y = grid.coords[i].tolist()
        assert f["geometry"]["coordinates"][0] == [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        m = f["properties"]["measurements"]
        assert m["attention"] == pytest.approx(att[i]) and m["attention_raw"] == pytest.approx(raw[i])
        assert m["prob_tumor"] == 0.75 and m["prob_normal"] == 0.25
        assert f["properties"]["classification"]["name"] == "tumor"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_topk_written_atomically(tmp_path: Path):
    tiles = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (10, 20, 30)])
    coords = np.array([[0, 0], [256, 0], [512, 256]])
    att = np.array([0.2, 0.9, 0.5])
    assert topk_indices(att, 2).tolist() == [1, 2]
    folder = write_topk(tmp_path, "s1", tiles, coords, att)
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.csv", "rank01_x256_y0.png", "rank02_x512_y256.png", "rank03_x0_y0.png"]
    index = pd.read_csv(folder / "index.csv")
    assert index["rank"].tolist() == [1, 2, 3] and index["attention"].tolist() == [0.9, 0.5, 0.2]
    assert cv2.imread(str(folder / "rank01_x256_y0.png"))[0, 0].tolist() == [20, 20, 20]
    write_topk(tmp_path, "s1", tiles[:1], coords[:1], att[:1])  # a re-run replaces the folder
    assert sorted(p.name for p in folder.iterdir()) == ["index.csv", "rank01_x0_y0.png"]
    assert [p.name for p in (tmp_path / "topk").iterdir()] == ["s1"]  # no temporary folder left
    assert outputs_complete(tmp_path, "s1", want_geojson=False, want_topk=3) is False  # no heatmap yet


def test_predictions_table_round_trips(tmp_path: Path):
    table = PredictionsTable(tmp_path, CLASSES)
    table.append({"slide_id": "001", "status": "ok", "error": "", "pred_class": "tumor", "pred_index": 1,
                  "prob_normal": np.float32(0.25), "prob_tumor": 0.75, "n_tiles": 120, "seconds": 1.5,
                  "tiles_per_s": 80.0, "m0_prob_tumor": 0.7})
    table.append({"slide_id": "bad", "status": "error", "error": "SlideOpenError: corrupt", "seconds": 0.1})
    table.close()  # the JSON copy is written when a run closes (compacts) its table
    again = PredictionsTable(tmp_path, CLASSES)
    assert again.rows == table.rows
    assert again.get("001")["pred_index"] == 1 and again.get("bad")["pred_class"] == ""
    csv = pd.read_csv(tmp_path / "predictions.csv", dtype={"slide_id": str})
    assert csv.columns.tolist()[:8] == ["slide_id", "status", "error", "pred_class", "pred_index",
                                         "prob_normal", "prob_tumor", "n_tiles"]
    assert csv["slide_id"].tolist() == ["001", "bad"] and "m0_prob_tumor" in csv.columns
    data = json.loads((tmp_path / "predictions.json").read_text())
    assert data["class_names"] == CLASSES and data["rows"][1]["prob_tumor"] is None
    again.append({"slide_id": "bad", "status": "ok", "error": "", "pred_class": "normal", "pred_index": 0})
    assert len(PredictionsTable(tmp_path, CLASSES)) == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_run_summary_and_completeness(tmp_path: Path):
    write_run_summary(tmp_path / "run_summary.json", slides=3, failures=1, tiles_per_s=np.float64(12.5),
                      wall_s=float("nan"), backend="onnxruntime")
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary == {"slides": 3, "failures": 1, "tiles_per_s": 12.5, "wall_s": None, "backend": "onnxruntime"}
    assert not outputs_complete(tmp_path, "nothing")
    assert slide_paths(tmp_path, "x")["geojson"] == tmp_path / "geojson" / "x.geojson"
