"""The overlap heatmap (`score --heatmap-overlap`): exact geometry, and a map that follows the lesion.

The geometry tests pin ``overlap_heatmap`` against a brute-force reading of its docstring and against
``grid_to_pixels``. The scoring test runs ``score_slides`` on a synthetic slide with stub models whose
attention is known in closed form (tile darkness, which is what marks the synthetic lesions), so the
dense map can be recomputed exactly from the slide and compared with the grid map and the lesion truth.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

import slidemil.engine.score as score
from slidemil.engine.heatmap import grid_to_pixels, normalize_attention, overlap_heatmap
from slidemil.engine.models import LoadedModel
from slidemil.runtime.pipeline import PipelineConfig
from slidemil.runtime.plan import ExecutionPlan
from slidemil.runtime.runners import Feed, Runner, TensorMeta
from slidemil.slide.grid import TileSpec, grid_from_coords, make_grid
from slidemil.slide.readers import open_slide
from slidemil.slide.synth import SlideTruth, write_slide
from slidemil.slide.tiling import TilingConfig, plan_tiles

TILING = TilingConfig()


def _brute_force_overlap(level0_size: tuple[int, int], coords: np.ndarray, size0: int, values: np.ndarray,
                         out_shape: tuple[int, int]) -> np.ndarray:
    """Mean of the tiles whose level-0 footprint holds each pixel centre (the docstring, one pixel at a time)."""
    h, w = out_shape
    out = np.full((h, w), np.nan, np.float32)
    for i in range(h):
        for j in range(w):
            x, y = (j + 0.5) * level0_size[0] / w, (i + 0.5) * level0_size[1] / h
            inside = ((coords[:, 0] <= x) & (x < coords[:, 0] + size0)
                      & (coords[:, 1] <= y) & (y < coords[:, 1] + size0))
            if inside.any():
                out[i, j] = values[inside].mean()
    return out


def test_overlap_heatmap_matches_brute_force_on_a_non_square_slide():
    rng = np.random.default_rng(0)
    level0, size0, out_shape = (640, 320), 80, (16, 32)  # 20 level-0 px per map pixel, wide slide
    xs, ys = np.arange(0, 640 - size0 + 1, 40), np.arange(0, 320 - size0 + 1, 40)  # stride = size / 2
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)
    coords = coords[rng.random(len(coords)) < 0.7]  # holes, as tissue leaves them
    values = rng.random(len(coords))
    got = overlap_heatmap(level0, coords, size0, values, out_shape)
    expected = _brute_force_overlap(level0, coords, size0, values, out_shape)
    assert got.shape == out_shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-6, equal_nan=True)


def test_overlap_heatmap_puts_one_hot_tile_where_it_lies():
    coords = np.array([[0, 0], [300, 100], [500, 0]], np.int64)  # x = 300..400, y = 100..200 is hot
    got = overlap_heatmap((600, 300), coords, 100, np.array([0.0, 1.0, 0.0]), (3, 6))
    expected = np.full((3, 6), np.nan, np.float32)
    expected[0, 0] = expected[0, 5] = 0.0
    expected[1, 3] = 1.0
    np.testing.assert_array_equal(got, expected)


def test_overlap_heatmap_of_a_plain_grid_equals_grid_to_pixels():
    rng = np.random.default_rng(1)
    level0, size0 = (4096, 3072), 256
    cells = np.argwhere(rng.random((12, 16)) < 0.6)
    grid = grid_from_coords(cells[:, ::-1] * size0, size0, size0, level0, 0.5)
    values = rng.random(len(grid)).astype(np.float32)
    shape = (192, 256)
    plain = grid_to_pixels(grid, grid.to_grid(values), shape)
    np.testing.assert_allclose(overlap_heatmap(level0, grid.coords, size0, values, shape), plain, equal_nan=True)


class _StubRunner(Runner):
    backend = "stub"

    def _activate(self) -> None:
        pass

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {}


class _MeanColour(_StubRunner):
    """Stub backbone runner: features = mean RGB of each tile / 255, (B, 3)."""

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {"tiles": TensorMeta("uint8", (None, 256, 256, 3))}

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        tiles = feed["tiles"]
        return {"features": (tiles.mean(axis=(1, 2)) / 255.0).astype(np.float32)}


class _DarknessHead(_StubRunner):
    """Stub head runner: attention_raw = 1 - mean red (synthetic lesions are dark); tumour if any is dark."""

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        raw = (1.0 - feed["features"][:, 0]).astype(np.float32)
        attention = np.exp(raw - raw.max()) / np.exp(raw - raw.max()).sum()
        logits = np.array([0.0, float(raw.max())], np.float32)
        probabilities = np.exp(logits) / np.exp(logits).sum()
        return {"logits": logits, "probabilities": probabilities, "attention": attention, "attention_raw": raw}


@contextlib.contextmanager
def _stub_models(*_args: Any, **_kwargs: Any) -> Iterator[list[LoadedModel]]:
    package = SimpleNamespace(class_names=["normal", "tumour"], tiling=TILING, card=SimpleNamespace(feature_dim=3),
                              manifest=SimpleNamespace(operating_point=None))  # no operating point: argmax
    plan = ExecutionPlan("stub", "cpu", "fp32")
    yield [LoadedModel(name="stub", package=package, plan=plan,  # type: ignore[arg-type]
                       backbone=_MeanColour().activate(), head=_DarknessHead().activate())]


def _expected_overlap_map(path: Path, overlap: float, norm: str) -> np.ndarray:
    """The overlap map recomputed straight from the slide: dense grid, stub scores, ``overlap_heatmap``."""
    with open_slide(path) as reader:
        plan = plan_tiles(reader, TILING)
        spec: TileSpec = replace(TILING.tile, overlap=int(round(TILING.tile.patch_size * overlap)))
        dense = make_grid(plan.grid.level0_size, plan.grid.slide_mpp, spec, plan.tissue)
        tiles = reader.read_tiles(dense.coords, dense.patch_size_level0, spec.patch_size)
    raw = _DarknessHead().activate().infer(_MeanColour().activate().infer({"tiles": tiles}))["attention_raw"]
    return overlap_heatmap(dense.level0_size, dense.coords, dense.patch_size_level0,
                           normalize_attention(raw, norm), plan.thumbnail.shape[:2])


def _lesion_at_pixels(truth: SlideTruth, level0_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Truth lesion mask sampled at the centres of an (h, w) map of the whole slide."""
    h, w = shape
    d = truth.mask_downsample
    x = ((np.arange(w) + 0.5) * level0_size[0] / w // d).astype(int)
    y = ((np.arange(h) + 0.5) * level0_size[1] / h // d).astype(int)
    return truth.lesion[np.minimum(y, truth.lesion.shape[0] - 1)[:, None], np.minimum(x, truth.lesion.shape[1] - 1)]


def test_scored_overlap_map_is_exact_and_follows_the_lesion(tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    slides.mkdir()
    truth = write_slide(slides / "lesion.svs", size=2048, label=1, n_classes=2, lesion_fraction=0.12,
                        rng=np.random.default_rng(12))
    monkeypatch.setattr(score, "open_models", _stub_models)
    cfg = score.ScoreConfig(backend="stub", device="cpu", top_k=0, geojson=False, heatmap_overlap=0.5,
                            reading=PipelineConfig(batch_size=8, workers=2, queue_batches=2))
    out = tmp_path / "out"
    score.score_slides([tmp_path / "stub"], slides, out, cfg)

    overlap = np.load(out / "heatmaps" / "lesion.overlap.npy")
    sidecar = json.loads((out / "heatmaps" / "lesion.json").read_text())
    grid_map = np.load(out / "heatmaps" / "lesion.npy")
    level0 = tuple(sidecar["level0_size"])
    # every dense tile scored, in coords order: the map is the one recomputed from the slide
    expected = _expected_overlap_map(slides / "lesion.svs", 0.5, cfg.attention_norm)
    assert overlap.shape == expected.shape and np.isfinite(overlap).sum() > 400
    np.testing.assert_allclose(overlap, expected, atol=1e-5, equal_nan=True)
    # it agrees with the plain grid heatmap of the same slide
    cells = np.argwhere(np.isfinite(grid_map))
    grid = grid_from_coords(cells[:, ::-1] * sidecar["stride_level0"], sidecar["patch_size_level0"],
                            sidecar["stride_level0"], level0, sidecar["slide_mpp"])
    plain = grid_to_pixels(grid, grid_map, overlap.shape)
    both = np.isfinite(plain) & np.isfinite(overlap)
    assert np.corrcoef(plain[both], overlap[both])[0, 1] >= 0.8
    # and it lights up the lesion
    lesion = _lesion_at_pixels(truth, level0, overlap.shape)
    on = np.isfinite(overlap)
    assert 50 <= lesion[on].sum() < on.sum() / 2
    assert roc_auc_score(lesion[on], overlap[on]) >= 0.9
    assert np.nanmean(overlap[on & lesion]) - np.nanmean(overlap[on & ~lesion]) >= 0.4
