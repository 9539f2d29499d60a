"""Tissue detection and the tile grid."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from slidemil.errors import ConfigError, NoTissueError, ResolutionError
from slidemil.slide.grid import TileSpec, covered_by_tiles, make_grid, tissue_fractions
from slidemil.slide.readers import open_slide
from slidemil.slide.tissue import TissueConfig, TissueMask, detect_tissue, segment_tissue


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_tissue_matches_synthetic_truth(synth_slide):
    path, truth = synth_slide
    with open_slide(path) as r:
        mask, thumb = detect_tissue(r, TissueConfig(thumb_mpp=truth.mask_mpp))
    assert mask.mpp == pytest.approx(truth.mask_mpp, rel=0.01)
    expected = cv2.resize(truth.tissue.astype(np.uint8), mask.mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert iou(mask.mask, expected) >= 0.97


def test_tissue_on_real_skin_covers_tissue_not_glass(real_data):
    with open_slide(real_data / "CMU-1-Small-Region.svs") as r:
        mask, thumb = detect_tissue(r)
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    stained = (hsv[..., 1] > 40) & (hsv[..., 2] < 230)  # clearly stained pixels
    glass = (hsv[..., 1] < 8) & (hsv[..., 2] > 235)  # bright unstained glass
    assert mask.mask[stained].mean() > 0.95
    assert mask.mask[glass].mean() < 0.10
    assert 0.2 < mask.fraction < 0.5


def test_blank_slide_has_no_tissue(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((400, 400, 3), 242, np.uint8)).save(tmp_path / "blank.png")
    with open_slide(tmp_path / "blank.png", mpp=2.0) as r:
        with pytest.raises(NoTissueError, match="blank"):
            detect_tissue(r)


def test_user_mask_and_whole_slide(tmp_path, real_data):
    mask_img = np.zeros((50, 40), np.uint8)
    mask_img[:25] = 255  # top half, at an arbitrary size
    cv2.imwrite(str(tmp_path / "CMU-1-Small-Region_mask.png"), mask_img)
    with open_slide(real_data / "CMU-1-Small-Region.svs") as r:
        user, _ = detect_tissue(r, TissueConfig(method="mask", mask_dir=str(tmp_path)))
        whole, _ = detect_tissue(r, TissueConfig(method="whole"))
    h = user.mask.shape[0]
    assert user.mask[: h // 2 - 1].all() and not user.mask[h // 2 + 1:].any()
    assert whole.mask.all()
    with pytest.raises(ConfigError):
        TissueConfig(method="mask")


def test_segment_is_resolution_independent(synth_slide):
    path, _ = synth_slide
    with open_slide(path) as r:
        fine, mpp_f = r.thumbnail(mpp=8.0)
        coarse, mpp_c = r.thumbnail(mpp=16.0)
    a = segment_tissue(fine, mpp_f)
    b = segment_tissue(coarse, mpp_c)
    a_small = cv2.resize(a.astype(np.uint8), b.shape[::-1], interpolation=cv2.INTER_AREA) > 0
    assert iou(a_small, b) > 0.95


def test_grid_exact_coords_on_known_tissue():
    # slide 1000 x 600 level-0 px at 0.25 mpp; mask at 4 um/px -> 16 level-0 px per mask px
    mask = np.zeros((600 // 16 + 1, 1000 // 16 + 1), bool)
    mask[:, : 256 // 16] = True  # the left 256 level-0 px are tissue
    tissue = TissueMask(mask=mask, mpp=4.0, source="test")
    spec = TileSpec(patch_size=64, mpp=0.5, min_tissue=0.5)  # 128 level-0 px per tile
    grid = make_grid((1000, 600), 0.25, spec, tissue)
    assert grid.patch_size_level0 == 128 and grid.shape == (4, 7)
    expected = np.array([[x, y] for y in (0, 128, 256, 384) for x in (0, 128)], dtype=np.int64)
    np.testing.assert_array_equal(grid.coords, expected)
    assert grid.coords.dtype == np.int64
    np.testing.assert_array_equal(grid.cells, expected[:, ::-1] // 128)
    heat = grid.to_grid(np.arange(len(grid), dtype=np.float32))
    assert np.isnan(heat[:, 2:]).all() and heat[1, 1] == 3


def test_grid_overlap_and_fraction_is_exact():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    tissue = TissueMask(mask=mask, mpp=1.0, source="test")
    frac = tissue_fractions(tissue, 0.5, np.array([[0, 0], [8, 0], [10, 0]]), 4)  # tiles 2 mask px wide
    np.testing.assert_allclose(frac, [1.0, 0.5, 0.0])
    spec = TileSpec(patch_size=8, mpp=1.0, overlap=4, min_tissue=0.0)
    grid = make_grid((20, 20), 1.0, spec, tissue)
    assert grid.stride_level0 == 4 and grid.shape == (4, 4) and len(grid) == 16


def test_tile_spec_rejects_bad_values():
    with pytest.raises(ConfigError):
        TileSpec(overlap=256)
    with pytest.raises(ConfigError):
        TileSpec(min_tissue=1.5)


def test_a_coarser_slide_is_refused_with_its_mpp_the_target_and_the_fix():
    tissue = TissueMask(mask=np.ones((60, 80), bool), mpp=16.78 * 16, source="test")
    with pytest.raises(ResolutionError, match=r"16\.78 um/px, coarser than the target 0\.5 um/px.*blown up "
                                              r"33\.6x.*--mpp 16\.78.*--allow-upsample"):
        make_grid((1280, 960), 16.78, TileSpec(), tissue)
    assert len(make_grid((1280, 960), 0.54, TileSpec(), tissue)) > 0  # within the 10% scanners differ by
    assert len(make_grid((1280, 960), 16.78, TileSpec(mpp=16.0), tissue)) == 15  # 244 slide px per tile
    assert make_grid((1280, 960), 16.78, TileSpec(allow_upsample=True), tissue).patch_size_level0 == 8


def _fragment_mask() -> TissueMask:
    """A 1024 um square slide at 0.5 um/px with a large tissue region and, apart, a strip 48 um wide
    (narrower than half a 128 um tile) across three tiles of one column."""
    mask = np.zeros((256, 256), bool)  # 4 um (8 level-0 px) per mask px
    mask[20:120, 20:120] = True
    mask[140:220, 172:184] = True  # level-0 x 1376-1472 (tile column 1280), y 1120-1760
    return TissueMask(mask=mask, mpp=4.0, source="test")


def test_a_fragment_narrower_than_half_a_tile_gets_tiles():
    tissue = _fragment_mask()
    strip = np.array([[1280, y] for y in (1024, 1280, 1536)])
    assert tissue_fractions(tissue, 0.5, strip, 256).max() < 0.5  # no tile of the strip is half tissue
    grid = make_grid((2048, 2048), 0.5, TileSpec(min_tissue=0.5), tissue)
    on_strip = grid.coords[grid.coords[:, 1] >= 1024]
    np.testing.assert_array_equal(on_strip, strip)  # every tile the strip crosses, and no other
    covered = covered_by_tiles(tissue.mask.shape, tissue.mpp, 0.5, grid.coords, grid.patch_size_level0)
    assert covered[140:220, 172:184].all()


def test_coverage_is_the_share_of_tissue_under_tiles():
    mask = np.zeros((256, 256), bool)
    mask[20:150, 20:150] = True  # level-0 160-1200: whole tiles cover 768^2 of 1040^2, more than half
    tissue = TissueMask(mask=mask, mpp=4.0, source="test")
    grid = make_grid((2048, 2048), 0.5, TileSpec(min_tissue=1.0), tissue)
    assert len(grid) == 9 and grid.tissue_coverage == pytest.approx(768**2 / 1040**2)
    covered = covered_by_tiles(tissue.mask.shape, tissue.mpp, 0.5, grid.coords, grid.patch_size_level0)
    assert grid.tissue_coverage == pytest.approx((covered & tissue.mask).sum() / tissue.mask.sum())
    assert make_grid((2048, 2048), 0.5, TileSpec(min_tissue=0.0), tissue).tissue_coverage == 1.0


def test_default_tiling_covers_synthetic_tissue_without_glass_tiles(synth_slide):
    from slidemil.slide.tiling import TilingConfig, plan_tiles
    path, truth = synth_slide
    with open_slide(path) as r:
        plan = plan_tiles(r, TilingConfig())
    assert plan.grid.tissue_coverage >= 0.95
    true_tissue = TissueMask(truth.tissue, truth.mask_mpp, "truth")
    true_share = tissue_fractions(true_tissue, plan.grid.slide_mpp, plan.grid.coords, plan.grid.patch_size_level0)
    assert true_share.min() >= 0.01  # no tile of glass alone
