"""h5 store round trips and `slidemil tile` on folders with good and bad slides."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from slidemil.cli import main
from slidemil.errors import StoreError
from slidemil.slide.store import SCHEMA_VERSION, CoordsAttrs, read_h5, write_h5

ATTRS = CoordsAttrs(patch_size=256, patch_size_level0=512, patch_level=0, level0_magnification=40.0,
                    target_magnification=20.0, overlap=0, level0_width=4096, level0_height=3072, mpp=0.5,
                    slide_mpp=0.25, name="s1", stride_level0=512)


def test_h5_round_trip_with_every_attribute(tmp_path):
    coords = np.arange(2000, dtype=np.int64).reshape(-1, 2) * 512
    feats = np.random.default_rng(0).random((1000, 16), dtype=np.float32)
    write_h5(tmp_path / "s1.h5", coords, ATTRS, feats, encoder="resnet50_trunc", feature_attrs={"precision": "fp32"})
    bag = read_h5(tmp_path / "s1.h5")
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.attrs == ATTRS and bag.encoder == "resnet50_trunc" and bag.feature_attrs["precision"] == "fp32"
    with h5py.File(tmp_path / "s1.h5") as f:  # the loading pattern of CLAM and TRIDENT
        assert f["coords"].dtype == np.int64 and f["features"].dtype == np.float32
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0
        assert 256 <= f["coords"].chunks[0] <= 1024 and f.attrs["slidemil_schema"] == SCHEMA_VERSION
        assert f["features"].attrs["encoder"] == "resnet50_trunc"


def test_empty_slide_is_written_not_skipped(tmp_path):
    write_h5(tmp_path / "e.h5", np.zeros((0, 2)), ATTRS, np.zeros((0, 8)), encoder="x")
    bag = read_h5(tmp_path / "e.h5")
    assert bag.coords.shape == (0, 2) and bag.features.shape == (0, 8)


def test_truncated_and_foreign_files_raise_store_error(tmp_path):
    write_h5(tmp_path / "s1.h5", np.zeros((600, 2)), ATTRS, np.zeros((600, 64)), encoder="x")
    data = (tmp_path / "s1.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        read_h5(tmp_path / "cut.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="no 'coords'"):
        read_h5(tmp_path / "foreign.h5")
    with pytest.raises(StoreError, match="no such file"):
        read_h5(tmp_path / "missing.h5")


def test_tile_command_on_a_folder_with_bad_slides(tmp_path, synth_cohort, real_data):
    cohort, table = synth_cohort
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    for name in ("unreadable.svs", "unopenable.tiff", "CMU-1-Small-Region.svs"):
        shutil.copy(real_data / name, slides / name)
    out = tmp_path / "tiles"
    assert main(["tile", str(slides), "--out", str(out)]) == 0
    log = pd.read_csv(out / "tiling.csv").set_index("slide_id")
    assert log.loc["unreadable", "status"] == "error" and "unreadable.svs" in log.loc["unreadable", "error"]
    assert log.loc["unopenable", "status"] == "error" and "unopenable.tiff" in log.loc["unopenable", "error"]
    good = log[log.status == "ok"]
    assert len(good) == len(table) + 1 and (good.n_tiles > 0).all()
    for slide_id in good.index:
        assert (out / "masks" / f"{slide_id}.png").is_file()
        bag = read_h5(out / "coords" / f"{slide_id}.h5")
        assert len(bag.coords) == good.loc[slide_id, "n_tiles"]
    assert (out / "tiling_config.json").is_file()
    assert main(["check", str(out / "coords")]) == 0  # the h5 contract of docs/formats.md
    # n_tiles follows the tissue area: 256 px tiles at 0.5 mpp cover 128 um x 128 um; the tiles cover
    # `tissue_coverage` of the tissue, and each holds at least min_tissue (0.25) of tissue
    for slide_id, row in good.drop("CMU-1-Small-Region").iterrows():
        bag = read_h5(out / "coords" / f"{slide_id}.h5")
        tissue_um2 = row.tissue_fraction * bag.attrs.level0_width * bag.attrs.level0_height * 0.25
        assert row.tissue_coverage * tissue_um2 <= row.n_tiles * 128 * 128 <= tissue_um2 / 0.25
        assert row.tissue_coverage >= 0.9  # small slides (2048 px): edges weigh more than on real ones
    # a re-run skips finished slides and retries the failed ones
    before = (out / "coords" / f"{table.slide_id[0]}.h5").stat().st_mtime_ns
    assert main(["tile", str(slides), "--out", str(out)]) == 0
    assert (out / "coords" / f"{table.slide_id[0]}.h5").stat().st_mtime_ns == before
    assert not list(out.rglob(".tmp-*"))


def test_tile_real_skin_at_half_micron(tmp_path, real_data):
    out = tmp_path / "t"
    assert main(["tile", str(real_data / "CMU-1-Small-Region.svs"), "--out", str(out), "--mpp", "0.5",
                 "--patch-size", "256"]) == 0
    bag = read_h5(out / "coords" / "CMU-1-Small-Region.h5")
    assert bag.attrs.patch_size_level0 == 257 and 20 <= len(bag.coords) <= 60


def test_temporaries_of_a_killed_write_are_removed_and_only_those(tmp_path):
    from slidemil.atomic import remove_temporaries_of
    stale = [tmp_path / ".tmp-s1-abcd1234.h5", tmp_path / ".tmp-s1-zz_99xyz.h5"]
    other = [tmp_path / ".tmp-s1-b-abcd1234.h5", tmp_path / ".tmp-s1-abcd1234.png", tmp_path / "s1.h5"]
    for p in stale + other:
        p.write_bytes(b"x")
    assert remove_temporaries_of(tmp_path / "s1.h5") == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in other)


def test_a_low_resolution_dicom_is_refused_unless_tiled_at_its_own_resolution(tmp_path, real_data, caplog):
    """bone-marrow-jpeg.dcm is scanned at 16.78 um/px: at the default 0.5 um/px every tile would be
    8 slide pixels blown up 33x. The row names the slide's mpp, the target and the fixes."""
    dcm = real_data / "bone-marrow-jpeg.dcm"
    assert main(["tile", str(dcm), "--out", str(tmp_path / "default")]) == 0
    row = pd.read_csv(tmp_path / "default" / "tiling.csv").iloc[0]
    assert row.status == "error" and "16.78 um/px" in row.error and "0.5 um/px" in row.error
    assert "--mpp 16.78" in row.error and "--allow-upsample" in row.error
    assert not (tmp_path / "default" / "coords" / "bone-marrow-jpeg.h5").exists()
    assert main(["tile", str(dcm), "--out", str(tmp_path / "native"), "--mpp", "16.78", "--patch-size", "64"]) == 0
    native = read_h5(tmp_path / "native" / "coords" / "bone-marrow-jpeg.h5")
    assert native.attrs.patch_size_level0 == 64 and 20 <= len(native.coords) <= 160
    assert main(["tile", str(dcm), "--out", str(tmp_path / "forced"), "--allow-upsample"]) == 0
    forced = read_h5(tmp_path / "forced" / "coords" / "bone-marrow-jpeg.h5")
    assert forced.attrs.patch_size_level0 == 8 and len(forced.coords) > 1000
