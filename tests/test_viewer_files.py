"""Viewer files: a pyramidal OME-TIFF overlay aligned with level 0, and QuPath annotations."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile

from slidemil.engine.ome_overlay import TIFF_TILE, colour_lut, overlay_pixel, overlay_shape, value_range
from slidemil.engine.outputs import topk_indices
from slidemil.engine.viewer_files import (
    TISSUE_CLASS,
    TOP_CLASS,
    tissue_polygons,
    viewer_paths,
    write_viewer_files,
)
from slidemil.slide.grid import grid_from_coords
from slidemil.slide.readers import open_slide
from slidemil.slide.tiling import TilingConfig, plan_tiles
from slidemil.slide.tissue import TissueMask


@pytest.fixture(scope="module")
def planned(synth_slide):
    path, _ = synth_slide
    with open_slide(path) as reader:
        plan = plan_tiles(reader, TilingConfig())
    attention = np.random.default_rng(1).random(len(plan.grid)).astype(np.float32)
    return plan, attention


def large_grid():
    """A typical slide: 100,000 x 80,000 px at 0.25 um/px, 256 px tiles at 0.5 um/px (512 px at level 0)."""
    rng = np.random.default_rng(0)
    size0, width0, height0 = 512, 100_000, 80_000
    rows, cols = (height0 - size0) // size0 + 1, (width0 - size0) // size0 + 1
    yy, xx = np.mgrid[:rows, :cols]
    tissue = ((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2 < 1
    coords = np.stack([xx[tissue], yy[tissue]], axis=1) * size0
    grid = grid_from_coords(coords, size0, size0, (width0, height0), 0.25)
    return grid, rng.random(len(grid)).astype(np.float32)


def ome_pixels(tif: tifffile.TiffFile) -> dict:
    pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    return {k: pixels[k] for k in ("PhysicalSizeX", "PhysicalSizeY", "SizeX", "SizeY", "SizeC")}


def test_ome_tiff_is_pyramidal_tiled_and_spans_the_slide(tmp_path):
    grid, attention = large_grid()
    paths = write_viewer_files(tmp_path, "big", grid, attention, None, topk_indices(attention, 8))
    h, w = overlay_shape(grid)
    with tifffile.TiffFile(paths["ome_tiff"]) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(h, w, 3), (h // 2, w // 2, 3), (h // 4, w // 4, 3)]
        page = tif.pages[0]
        assert (page.tilewidth, page.tilelength) == (TIFF_TILE, TIFF_TILE) and page.dtype == np.uint8
        assert len(page.subifds or []) == len(levels) - 1
        px = ome_pixels(tif)
        assert (px["SizeX"], px["SizeY"], px["SizeC"]) == (w, h, 3)
        # the map's physical size is the slide's
        assert px["SizeX"] * px["PhysicalSizeX"] == pytest.approx(grid.level0_size[0] * grid.slide_mpp, rel=1e-9)
        assert px["SizeY"] * px["PhysicalSizeY"] == pytest.approx(grid.level0_size[1] * grid.slide_mpp, rel=1e-9)
        level0 = levels[0].asarray()
        description = json.loads(tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Description"])
    assert description["attention_norm"] == "percentile" and description["colormap"] == "jet"
    lut, (lo, hi) = colour_lut("jet"), value_range(attention)
    for i in np.random.default_rng(2).choice(len(grid), 25, replace=False):
        x, y = grid.coords[i] + grid.patch_size_level0 / 2  # a tile's centre, in level-0 pixels
        r, c = overlay_pixel(grid, (h, w), x, y)
        expected = lut[int(np.clip((attention[i] - lo) / (hi - lo) * 255 + 0.5, 0, 255))]
        assert np.array_equal(level0[r, c], expected)
    assert np.array_equal(level0[0, 0], [255, 255, 255])  # no tile there: white
    assert paths["ome_tiff"].stat().st_size < 2_000_000
    assert not list(tmp_path.rglob(".tmp-*"))  # written atomically


def test_openslide_opens_the_overlay_with_its_pixel_size(tmp_path, planned):
    openslide = pytest.importorskip("openslide")
    plan, attention = planned
    paths = write_viewer_files(tmp_path, "s", plan.grid, attention, plan.tissue, topk_indices(attention, 4),
                               pixels_per_tile=8)
    if openslide.OpenSlide.detect_format(str(paths["ome_tiff"])) is None:
        pytest.skip("this OpenSlide does not open the overlay")
    h, w = overlay_shape(plan.grid, 8)
    with openslide.OpenSlide(str(paths["ome_tiff"])) as slide, tifffile.TiffFile(paths["ome_tiff"]) as tif:
        assert slide.level_dimensions[0] == (w, h)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(ome_pixels(tif)["PhysicalSizeX"], rel=1e-4)
        region = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3]
        assert np.array_equal(region, tif.series[0].levels[0].asarray())


def test_annotations_hold_tissue_contours_and_top_tiles(tmp_path, planned):
    plan, attention = planned
    top = topk_indices(attention, 5)
    paths = write_viewer_files(tmp_path, "s", plan.grid, attention, plan.tissue, top)
    assert paths == viewer_paths(tmp_path, "s")
    fc = json.loads(paths["annotations"].read_text())
    assert fc["type"] == "FeatureCollection" and fc["slidemil"]["coordinates"] == "level-0 pixels"
    for f in fc["features"]:
        props = f["properties"]
        assert f["geometry"]["type"] == "Polygon" and props["objectType"] == "annotation"
        assert set(props["classification"]) == {"name", "color"} and len(props["classification"]["color"]) == 3
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
    tissue = [f for f in fc["features"] if f["properties"]["classification"]["name"] == TISSUE_CLASS]
    tops = [f for f in fc["features"] if f["properties"]["classification"]["name"] == TOP_CLASS]
    assert tissue and [f["properties"]["name"] for f in tops] == [f"{TOP_CLASS} #{k}" for k in range(1, 6)]
    s = plan.grid.patch_size_level0
    for f, i in zip(tops, top):
        x, y = plan.grid.coords[i].tolist()
        assert f["geometry"]["coordinates"][0][0] == [x, y] and f["geometry"]["coordinates"][0][2] == [x + s, y + s]
        assert f["properties"]["measurements"]["attention"] == pytest.approx(float(attention[i]))
    # the contours, drawn back at the mask's resolution, are the tissue mask
    mask = plan.tissue.mask
    scale = plan.tissue.mpp / plan.grid.slide_mpp
    drawn = np.zeros(mask.shape, np.uint8)
    for f in tissue:
        rings = [np.round(np.asarray(r) / scale - 0.5).astype(np.int32) for r in f["geometry"]["coordinates"]]
        cv2.fillPoly(drawn, rings, 1)  # even-odd: holes stay empty
    iou = (drawn.astype(bool) & mask).sum() / (drawn.astype(bool) | mask).sum()
    assert iou > 0.95


def test_tissue_polygons_keep_holes_and_orientation():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:40, 30:50] = False  # a hole
    mask[25:35, 36:44] = True  # an island in the hole
    polygons = tissue_polygons(mask, scale=4.0, simplify_px=0)
    assert sorted(len(p) for p in polygons) == [1, 2]  # the island alone; the frame with its hole
    frame = next(p for p in polygons if len(p) == 2)

    def area(ring):
        xy = np.asarray(ring[:-1])
        return 0.5 * (np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(np.roll(xy[:, 0], -1), xy[:, 1]))
    assert area(frame[0]) > 0 > area(frame[1])  # outer counter-clockwise with y up, hole clockwise
    xs = [x for x, _ in frame[0]]
    assert min(xs) == pytest.approx(10.5 * 4) and max(xs) == pytest.approx(69.5 * 4)  # level-0 pixels


def test_without_a_tissue_mask_the_tiles_footprint_is_the_tissue(tmp_path, planned):
    plan, attention = planned
    paths = write_viewer_files(tmp_path, "s", plan.grid, attention, None, topk_indices(attention, 3))
    fc = json.loads(paths["annotations"].read_text())
    assert fc["slidemil"]["tissue_source"] == "tiles"
    assert any(f["properties"]["classification"]["name"] == TISSUE_CLASS for f in fc["features"])
    empty = TissueMask(np.zeros((4, 4), bool), 8.0, "otsu")
    paths = write_viewer_files(tmp_path, "s", plan.grid, attention, empty, topk_indices(attention, 3))
    assert json.loads(paths["annotations"].read_text())["slidemil"]["tissue_source"] == "tiles"
