"""Slide discovery as labs store slides: nested folders, ``**`` globs, DICOM series, MRXS, VMS/VMU."""

from __future__ import annotations

import glob
import logging
import pickle
import shutil
import time
from pathlib import Path

import openslide
import pydicom
import pytest

from slidemil.errors import LabelTableError
from slidemil.slide.discovery import _glob
from slidemil.slide.readers import open_slide
from slidemil.slide.table import SlideEntry, _check_unique_ids, load_slides
from tests.dicom_fixtures import add_label, renew_series, write_pyramid_series

BONE = "bone-marrow-jpeg.dcm"
BONE_LEVELS = [(957, 715), (478, 357)]


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ids(entries: list[SlideEntry]) -> list[str]:
    return [e.slide_id for e in entries]


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory, real_data: Path) -> Path:
    """A 2-level DICOM WSI series with a label image, one file each, level 0 not first by name."""
    folder = tmp_path_factory.mktemp("dicom") / "series"
    _, level1 = write_pyramid_series(real_data / BONE, folder, names=["b_level0.dcm", "a_level1.dcm"])
    add_label(level1, folder / "0_label.dcm")
    return folder


def _copy_series(series_dir: Path, target: Path) -> list[Path]:
    """Copy the written series into ``target`` (same UIDs); returns the copied files."""
    shutil.copytree(series_dir, target, dirs_exist_ok=True)
    return sorted(target.glob("*.dcm"))


# -- folders and globs ---------------------------------------------------------------------
def test_folder_is_searched_recursively_skipping_hidden_and_temporaries(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    for rel in ["case_02/slide_b.ndpi", "case_01/slide_a.svs", "case_01/deep/er/slide_c.SVS", "top.tiff",
                ".hidden/slide_h.svs", "case_01/.slide_dot.svs", "case_01/.tmp-slide_a-x1y2.svs",
                "case_01/slide_a.tmp-9.svs", ".tmp-run-abc/slide_t.svs", "notes.txt", "case_02/table.csv"]:
        _touch(root / rel)
    entries = load_slides(root)
    assert _ids(entries) == ["slide_c", "slide_a", "slide_b", "top"]
    assert [e.path.relative_to(root).as_posix() for e in entries] == [
        "case_01/deep/er/slide_c.SVS", "case_01/slide_a.svs", "case_02/slide_b.ndpi", "top.tiff"]
    assert load_slides(root) == entries, "order is deterministic"


def test_glob_double_star_spans_folders(tmp_path: Path) -> None:
    for rel in ["a/x.svs", "b/c/y.svs", "b/c/z.ndpi", "w.svs"]:
        _touch(tmp_path / rel)
    assert _ids(load_slides(f"{tmp_path}/**/*.svs")) == ["x", "y", "w"]
    assert _ids(load_slides(f"{tmp_path}/*/*.svs")) == ["x"]
    assert _ids(load_slides(f"{tmp_path}/b/*")) == ["y", "z"], "a matched folder is searched like a folder"


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    _touch(tmp_path / "elsewhere" / "case_9" / "s9.svs")
    _touch(root / "case_1" / "s1.svs")
    (root / "case_9").symlink_to(tmp_path / "elsewhere" / "case_9", target_is_directory=True)
    (root / "case_1" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "alias_1").symlink_to(root / "case_1", target_is_directory=True)  # the same folder twice
    assert _ids(load_slides(root)) in (["s9", "s1"], ["s1", "s9"])
    assert sorted(_ids(load_slides(f"{root}/**"))) == ["s1", "s9"]


@pytest.mark.parametrize("pattern", ["**", "**/*.svs", "a/**/*.svs", "**/c/*", "*/**/y.*", "a/**", "b/**/c"])
def test_double_star_matches_like_the_standard_glob(tmp_path: Path, pattern: str, monkeypatch) -> None:
    for rel in ["a/x.svs", "a/b/c/y.svs", "b/c/z.ndpi", "w.svs", "b/c/y.tif", ".h/x.svs"]:
        _touch(tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    for text in (pattern, f"{tmp_path}/{pattern}"):
        ours = sorted(Path(p) for p in _glob(text))
        assert ours == sorted(Path(p) for p in glob.glob(text, recursive=True)) and ours


def test_empty_selection_still_raises(tmp_path: Path) -> None:
    _touch(tmp_path / ".hidden.svs")
    _touch(tmp_path / "x.tmp-1.svs")
    with pytest.raises(LabelTableError, match="no slides found"):
        load_slides(tmp_path)
    with pytest.raises(LabelTableError, match="no slides found"):
        load_slides(f"{tmp_path}/**/*.ndpi")


def test_nested_cohort_with_svs_and_a_dicom_series(tmp_path: Path, real_data: Path, series_dir: Path) -> None:
    root = tmp_path / "root"
    for rel in ["a/x.svs", "b/c/y.svs"]:
        (root / rel).parent.mkdir(parents=True)
        shutil.copy(real_data / "small.svs", root / rel)
    _copy_series(series_dir, root / "b" / "scan_7")
    entries = load_slides(root)
    assert [(e.slide_id, e.path.relative_to(root).as_posix()) for e in entries] == [
        ("x", "a/x.svs"), ("y", "b/c/y.svs"), ("scan_7", "b/scan_7/b_level0.dcm")]
    for entry in entries:
        with open_slide(entry.path, mpp=entry.mpp, slide_id=entry.slide_id) as reader:
            assert reader.slide_id == entry.slide_id and reader.dimensions[0] > 0
    assert _ids(load_slides(f"{root}/**/*.svs")) == ["x", "y"]


# -- DICOM series ----------------------------------------------------------------------------
def test_written_series_opens_as_two_levels_from_either_file(series_dir: Path) -> None:
    headers = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in series_dir.glob("*.dcm")}
    assert len({str(h.SeriesInstanceUID) for h in headers.values()}) == 1
    assert len({str(h.SOPInstanceUID) for h in headers.values()}) == 3
    level1 = headers["a_level1.dcm"]
    spacing = level1.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([2 * 0.016783] * 2)
    assert level1.DimensionOrganizationType == "TILED_FULL" and int(level1.NumberOfFrames) == 4
    for name in ("b_level0.dcm", "a_level1.dcm"):
        slide = openslide.OpenSlide(str(series_dir / name))
        try:
            assert slide.level_count == 2
            assert [tuple(d) for d in slide.level_dimensions] == BONE_LEVELS
            assert slide.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
            assert slide.associated_images["label"].size == (160, 119)
        finally:
            slide.close()


def test_dicom_series_folder_is_one_slide_named_after_it(tmp_path: Path, series_dir: Path) -> None:
    folder = tmp_path / "case_17"
    _copy_series(series_dir, folder)
    entries = load_slides(folder)
    assert entries == [SlideEntry("case_17", folder / "b_level0.dcm")], "the level-0 VOLUME file, not the first name"
    with open_slide(entries[0].path, slide_id=entries[0].slide_id) as reader:
        assert reader.level_count == 2 and reader.level_dimensions == BONE_LEVELS
        assert reader.mpp == pytest.approx(16.783, rel=1e-3)
        assert reader.slide_id == "case_17"
        clone = pickle.loads(pickle.dumps(reader))
    try:
        assert clone.slide_id == "case_17" and clone.level_count == 2
    finally:
        clone.close()
    # a glob matching any file of the series gives it once, as folder discovery does
    assert load_slides(f"{tmp_path}/**/*.dcm") == entries
    assert load_slides(str(folder / "0_label.dcm")) == entries


def test_several_series_in_one_folder_get_uid_suffixes(tmp_path: Path, real_data: Path, series_dir: Path) -> None:
    folder = tmp_path / "export"
    _copy_series(series_dir, folder)
    second = [folder / f"s2_{p.name}" for p in sorted(series_dir.glob("*.dcm"))]
    for src, dst in zip(sorted(series_dir.glob("*.dcm")), second):
        shutil.copy(src, dst)
    uid2 = renew_series(second)
    uid1 = str(pydicom.dcmread(folder / "b_level0.dcm", stop_before_pixels=True).SeriesInstanceUID)
    shutil.copy(real_data / "boxes_0.dcm", folder / "boxes_0.dcm")  # a single-file series: named after the file
    entries = load_slides(folder)
    assert {e.slide_id: e.path.name for e in entries} == {
        f"export_{uid1[-8:]}": "b_level0.dcm", f"export_{uid2[-8:]}": "s2_b_level0.dcm", "boxes_0": "boxes_0.dcm"}
    for entry in entries:
        slide = openslide.OpenSlide(str(entry.path))
        try:
            assert slide.level_count == (1 if entry.slide_id == "boxes_0" else 2)
        finally:
            slide.close()


def test_lab_export_without_suffixes_and_broken_dicom_files(tmp_path: Path, real_data: Path, series_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "pacs" / "slide_9"
    folder.mkdir(parents=True)
    for name, uid_name in [("b_level0.dcm", "1.2.826.0.1.5"), ("a_level1.dcm", "1.2.826.0.1.7")]:
        shutil.copy(series_dir / name, folder / uid_name)  # PACS exports name files by UID, no .dcm
    _touch(folder / "DICOMDIR", b"\0" * 128 + b"DICM")  # an index, not a slide
    _touch(folder / "broken.dcm", b"not a dicom file")
    no_series = pydicom.dcmread(real_data / "boxes_0.dcm")
    del no_series.SeriesInstanceUID
    no_series.save_as(folder / "no_series.dcm")
    with caplog.at_level(logging.WARNING, logger="slidemil.slide.discovery"):
        entries = load_slides(tmp_path / "pacs")
    assert {e.slide_id: e.path.name for e in entries} == {
        "slide_9": "1.2.826.0.1.5", "broken": "broken.dcm", "no_series": "no_series.dcm"}
    assert "broken.dcm" in caplog.text and "no SeriesInstanceUID" in caplog.text
    with open_slide(folder / "1.2.826.0.1.5", slide_id="slide_9") as reader:
        assert reader.level_count == 2


# -- MRXS and VMS/VMU --------------------------------------------------------------------------
def test_mrxs_is_one_slide_and_its_data_folder_is_not_searched(tmp_path: Path) -> None:
    _touch(tmp_path / "x.mrxs", b"[GENERAL]\n")
    _touch(tmp_path / "x" / "Slidedat.ini", b"[GENERAL]\nSLIDE_ID=1\n")
    _touch(tmp_path / "x" / "Data0000.dat")
    _touch(tmp_path / "x" / "Data0001.dat")
    _touch(tmp_path / "x" / "preview.jpg")  # would be a plain-image slide if the folder were searched
    expected = [SlideEntry("x", tmp_path / "x.mrxs")]
    assert load_slides(tmp_path) == expected
    assert load_slides(f"{tmp_path}/**/*") == expected
    assert load_slides(f"{tmp_path}/x/*.dat") == expected


VMS_TEXT = """[Virtual Microscope Specimen]
NoLayers=1
NoJpegColumns=2
NoJpegRows=1
ImageFile=y.jpg
ImageFile(1,0)=y_1.jpg
MapFile=y.map
OptimisationFile=y.opt
MacroImage=y_macro.jpg
PhysicalWidth=2000
Notes=not a file name
"""

VMU_TEXT = """[Uncompressed Virtual Microscope Specimen]
NoLayers=1
ImageFile=z.ngr
MapFile=z.map
"""


def test_vms_and_vmu_are_one_slide_each_and_their_images_are_not_slides(tmp_path: Path) -> None:
    _touch(tmp_path / "y.vms", VMS_TEXT.encode())
    for name in ["y.jpg", "y_1.jpg", "y_macro.jpg", "y.map", "y.opt"]:
        _touch(tmp_path / name)
    _touch(tmp_path / "z.vmu", VMU_TEXT.encode())
    _touch(tmp_path / "z.ngr")
    _touch(tmp_path / "z.map")
    _touch(tmp_path / "other.jpg")  # not named by the index: a plain-image slide of its own
    entries = load_slides(tmp_path)
    assert {e.slide_id: e.path.name for e in entries} == {"other": "other.jpg", "y": "y.vms", "z": "z.vmu"}
    assert {e.slide_id for e in load_slides(f"{tmp_path}/*.jpg")} == {"other", "y"}


# -- ids ---------------------------------------------------------------------------------------
def test_duplicate_ids_are_reported_with_their_paths(tmp_path: Path) -> None:
    for rel in ["a/x.svs", "b/x.svs", "b/y.svs"]:
        _touch(tmp_path / rel)
    with pytest.raises(LabelTableError) as info:
        load_slides(tmp_path)
    message = str(info.value)
    assert "'x'" in message and str(tmp_path / "a" / "x.svs") in message and str(tmp_path / "b" / "x.svs") in message
    assert "CSV" in message and "slide_id" in message and "'y'" not in message


def test_duplicate_check_is_linear() -> None:
    entries = [SlideEntry(f"s{i}", Path(f"/data/s{i}.svs")) for i in range(200_000)]
    start = time.perf_counter()
    _check_unique_ids(entries)
    assert time.perf_counter() - start < 5.0, "a quadratic check takes minutes on 200k slides"
    with pytest.raises(LabelTableError, match="'s7'"):
        _check_unique_ids([*entries, SlideEntry("s7", Path("/other/s7.svs"))])


def test_csv_keeps_its_behaviour_and_accepts_a_series_folder(tmp_path: Path, series_dir: Path) -> None:
    _copy_series(series_dir, tmp_path / "series_a")
    _touch(tmp_path / "slides" / "p.svs")
    (tmp_path / "table.csv").write_text("slide_id,path,mpp\nP1,slides/p.svs,0.5\nD1,series_a,\n")
    assert load_slides(tmp_path / "table.csv") == [
        SlideEntry("P1", tmp_path / "slides" / "p.svs", 0.5), SlideEntry("D1", tmp_path / "series_a" / "b_level0.dcm")]
    (tmp_path / "ids.csv").write_text("path\nseries_a\n")
    assert _ids(load_slides(tmp_path / "ids.csv")) == ["series_a"]
    (tmp_path / "bad.csv").write_text("slide_id,path\nS,slides\nT,slides\n")
    _touch(tmp_path / "slides" / "q.svs")
    with pytest.raises(LabelTableError, match="folder holding 2 slides"):
        load_slides(tmp_path / "bad.csv")
