"""The slide reader on the real fixtures of tests/data and on small made-up images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slidemil.errors import MissingMppError, SlideOpenError, SlideReadError
from slidemil.slide.readers import open_slide


def test_aperio_svs_geometry_and_mpp(real_data):
    with open_slide(real_data / "CMU-1-Small-Region.svs") as r:
        assert r.reader_name == "openslide" and r.vendor == "aperio"
        assert r.dimensions == (2220, 2967) and r.level_count == 1
        assert r.mpp == pytest.approx(0.499)
        assert r.magnification == 20.0
        assert r.slide_id == "CMU-1-Small-Region"


def test_dicom_wsi_opens(real_data):
    with open_slide(real_data / "bone-marrow-jpeg.dcm") as r:
        assert r.vendor == "dicom" and r.dimensions == (957, 715)
        assert r.mpp == pytest.approx(16.783, rel=1e-3)


def test_generic_tiff_levels_and_missing_mpp(real_data):
    with open_slide(real_data / "boxes.tiff") as r:
        assert r.vendor == "generic-tiff" and r.level_count == 4
        assert r.level_dimensions[0] == (300, 250) and r.level_dimensions[-1] == (37, 31)
        with pytest.raises(MissingMppError, match="--slide-mpp"):
            _ = r.mpp
    with open_slide(real_data / "boxes.tiff", mpp=0.25) as r:
        assert r.mpp == 0.25


def test_plain_png_needs_an_mpp(real_data):
    with open_slide(real_data / "he-tile-1000.png") as r:
        assert r.reader_name == "image" and r.dimensions == (1000, 1000)
        with pytest.raises(MissingMppError):
            _ = r.mpp
    with open_slide(real_data / "he-tile-1000.png", mpp=0.5) as r:
        tiles = r.read_tiles(np.array([[0, 0], [500, 500]]), 256, 128)
        assert tiles.shape == (2, 128, 128, 3) and tiles.dtype == np.uint8
        full = np.asarray(Image.open(real_data / "he-tile-1000.png").convert("RGB"))
        # area interpolation of an exact 2x reduction is the mean of each 2x2 block
        expect = full[500:756, 500:756].reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(tiles[1].astype(float) - expect).max() <= 1.0


def test_unreadable_svs_is_a_read_error_naming_the_file(real_data):
    with open_slide(real_data / "unreadable.svs") as r:
        with pytest.raises(SlideReadError, match="unreadable.svs"):
            r.read_tiles(np.array([[0, 0]]), 16, 16)


def test_unopenable_tiff_is_an_open_error(real_data):
    with pytest.raises(SlideOpenError, match="unopenable.tiff"):
        open_slide(real_data / "unopenable.tiff")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideOpenError, match="not a slide format"):
        open_slide(tmp_path / "notes.txt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(SlideOpenError, match="broken.png"):
        open_slide(tmp_path / "broken.png")


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (200, 20, 20, 255)
    Image.fromarray(rgba).save(tmp_path / "half.png")
    with open_slide(tmp_path / "half.png", mpp=1.0) as r:
        tile = r.read_tiles(np.array([[0, 0]]), 40, 40)[0]
    assert (tile[:, :20] == (200, 20, 20)).all() and (tile[:, 20:] == 255).all()


def test_tiles_come_from_the_coarsest_level_that_keeps_resolution(real_data):
    with open_slide(real_data / "boxes.tiff", mpp=1.0) as r:
        assert r.best_level_for(1.0) == 0
        assert r.best_level_for(2.0) == 1
        assert r.best_level_for(3.9) == 1  # level 2 (4.016x) would lose resolution
        assert r.best_level_for(100) == 3
        via_level1 = r.read_tiles(np.array([[0, 0]]), 200, 100)[0]
        level1 = r.read_region(0, 0, (200, 200), (100, 100))
        assert via_level1.shape == (100, 100, 3)
        np.testing.assert_array_equal(via_level1, level1)
        thumb, mpp = r.thumbnail(mpp=4.0)
        assert thumb.shape == (62, 75, 3) and mpp == pytest.approx(4.0, rel=0.01)


def test_reader_pickles_by_path(real_data):
    import pickle
    with open_slide(real_data / "CMU-1-Small-Region.svs") as r:
        clone = pickle.loads(pickle.dumps(r))
        coords = np.array([[512, 512]])
        np.testing.assert_array_equal(clone.read_tiles(coords, 256, 256), r.read_tiles(coords, 256, 256))
        clone.close()
