"""Synthetic Aperio cohorts: file layout, truth masks, determinism, re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from slidemil.errors import ConfigError
from slidemil.slide.synth import (
    SynthConfig,
    cohort_table,
    make_cohort,
    slide_height,
    slide_rng,
    write_slide,
)

SIZE = 2048
CFG = SynthConfig(n_slides=4, n_classes=2, size=SIZE, lesion_fraction=0.03, seed=3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, CFG, progress=False)
    return out


def _mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127


def test_openslide_reads_aperio_pyramid(cohort: Path) -> None:
    height = slide_height(SIZE, 256)
    for path in sorted((cohort / "slides").glob("*.svs")):
        with openslide.OpenSlide(path) as slide:
            props = slide.properties
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == 0.5 and float(props["openslide.mpp-y"]) == 0.5
            assert float(props["openslide.objective-power"]) == 20
            assert slide.level_count == 2  # 16x would be smaller than a tile at this size
            assert slide.level_dimensions == ((SIZE, height), (SIZE // 4, height // 4))
            assert slide.level_downsamples == pytest.approx((1.0, 4.0))
            assert slide.associated_images["thumbnail"].size == (1024, 1024 * height // SIZE)
            tile = np.asarray(slide.read_region((SIZE // 2, height // 2), 0, (256, 256)))
            assert tile.shape == (256, 256, 4)


def test_metadata_patients_and_labels(cohort: Path) -> None:
    meta = pd.read_csv(cohort / "metadata.csv")
    assert list(meta.columns) == ["slide_id", "label", "patient_id", "path"]
    assert meta["label"].dtype.kind == "i"
    assert (meta.groupby("patient_id").size() == 2).all()
    assert (meta.groupby("patient_id")["label"].nunique() == 1).all()
    assert sorted(meta["label"]) == [0, 0, 1, 1]
    assert all((cohort / p).is_file() for p in meta["path"])
    assert meta.equals(cohort_table(CFG))


def test_truth_masks_and_lesion_fraction(cohort: Path) -> None:
    truth = json.loads((cohort / "truth.json").read_text())
    assert truth["mask_downsample"] == 16 and truth["mask_mpp"] == 8.0
    assert truth["config"]["seed"] == CFG.seed
    for rec in truth["slides"]:
        tissue = _mask(cohort / "tissue_truth" / f"{rec['slide_id']}.png")
        lesion = _mask(cohort / "lesion_masks" / f"{rec['slide_id']}.png")
        assert tissue.shape == (slide_height(SIZE, 256) // 16, SIZE // 16)
        assert 0.25 < tissue.mean() < 0.65
        assert not (lesion & ~tissue).any()
        if rec["label"] == 0:
            assert not lesion.any() and rec["lesions"] == []
        else:
            assert lesion.sum() / tissue.sum() == pytest.approx(CFG.lesion_fraction, rel=0.2)
            assert rec["lesion_fraction"] == pytest.approx(CFG.lesion_fraction, rel=0.2)


def test_tissue_truth_matches_thumbnail(cohort: Path) -> None:
    """A plain saturation threshold on the thumbnail already agrees with the truth: no ghost tissue."""
    for path in sorted((cohort / "slides").glob("*.svs")):
        with openslide.OpenSlide(path) as slide:
            thumb = np.asarray(slide.associated_images["thumbnail"].convert("RGB"))
        sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
        found = cv2.threshold(sat, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1].astype(bool)
        truth = _mask(path.parent.parent / "tissue_truth" / f"{path.stem}.png")
        truth = cv2.resize(truth.astype(np.uint8), found.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        assert (found & truth).sum() / (found | truth).sum() >= 0.97


def _mean_rgb(slide: openslide.OpenSlide, x: float, y: float, half: int) -> np.ndarray:
    region = slide.read_region((int(x) - half, int(y) - half), 0, (2 * half, 2 * half))
    return np.asarray(region.convert("RGB"), np.float64).reshape(-1, 3).mean(0)


def _normal_spot(tissue: np.ndarray, lesion: np.ndarray) -> tuple[float, float]:
    """Level-0 centre of the tissue cell farthest from glass and lesions."""
    keep = tissue & ~cv2.dilate(lesion.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    depth = cv2.distanceTransform(keep.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    return (x + 0.5) * 16, (y + 0.5) * 16


def test_lesions_differ_in_colour_from_normal_tissue(cohort: Path) -> None:
    truth = json.loads((cohort / "truth.json").read_text())
    for rec in (r for r in truth["slides"] if r["label"] == 1):
        tissue = _mask(cohort / "tissue_truth" / f"{rec['slide_id']}.png")
        lesion = _mask(cohort / "lesion_masks" / f"{rec['slide_id']}.png")
        with openslide.OpenSlide(cohort / "slides" / f"{rec['slide_id']}.svs") as slide:
            normal = _mean_rgb(slide, *_normal_spot(tissue, lesion), 48)
            for les in rec["lesions"]:
                inside = _mean_rgb(slide, les["x"], les["y"], int(les["radius"] * 0.6))
                assert np.abs(inside - normal).sum() > 60, (inside, normal)


def test_subtle_single_lesion(tmp_path: Path) -> None:
    truth = write_slide(
        tmp_path / "s.svs",
        size=SIZE,
        label=1,
        n_classes=2,
        lesion_fraction=0.008,
        n_lesions=1,
        subtle=True,
        rng=np.random.default_rng(11),
    )
    assert len(truth.lesions) == 1
    assert truth.lesion_fraction == pytest.approx(0.008, rel=0.1)
    assert truth.tissue.shape == (slide_height(SIZE, 256) // 16, SIZE // 16)
    with openslide.OpenSlide(tmp_path / "s.svs") as slide:
        x, y, r = truth.lesions[0]
        inside = _mean_rgb(slide, x, y, int(r * 0.6))
        normal = _mean_rgb(slide, *_normal_spot(truth.tissue, truth.lesion), 48)
    assert 15 < np.abs(inside - normal).sum() < 90


def test_same_seed_same_bytes_other_seed_differs(cohort: Path, tmp_path: Path) -> None:
    label = int(cohort_table(CFG)["label"][0])
    write_slide(tmp_path / "again.svs", label=label, rng=slide_rng(CFG.seed, 0), **CFG.slide_kwargs())
    write_slide(tmp_path / "other.svs", label=label, rng=slide_rng(CFG.seed + 1, 0), **CFG.slide_kwargs())
    first = (cohort / "slides" / "synth_0000.svs").read_bytes()
    assert (tmp_path / "again.svs").read_bytes() == first
    assert (tmp_path / "other.svs").read_bytes() != first


def test_rerun_skips_complete_slides_and_redoes_missing(tmp_path: Path) -> None:
    cfg = SynthConfig(n_slides=2, size=1024, seed=5)
    make_cohort(tmp_path, cfg, progress=False)
    slides = tmp_path / "slides"
    kept, redo = slides / "synth_0000.svs", slides / "synth_0001.svs"
    stamp, before = kept.stat().st_mtime_ns, redo.read_bytes()
    redo.unlink()
    (slides / ".tmp-synth_0001-x.svs").write_bytes(b"half a file")  # left by a killed run
    make_cohort(tmp_path, cfg, progress=False)
    assert kept.stat().st_mtime_ns == stamp
    assert redo.read_bytes() == before
    assert sorted(p.name for p in slides.iterdir()) == ["synth_0000.svs", "synth_0001.svs"]


def test_bad_geometry_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        SynthConfig(size=1000)
    with pytest.raises(ConfigError):
        SynthConfig(lesion_fraction=0.7)


@pytest.mark.slow
def test_full_size_slide_has_three_levels(tmp_path: Path) -> None:
    write_slide(
        tmp_path / "big.svs",
        size=8192,
        label=1,
        n_classes=2,
        lesion_fraction=0.03,
        rng=np.random.default_rng(0),
    )
    with openslide.OpenSlide(tmp_path / "big.svs") as slide:
        assert slide.level_count == 3
        assert slide.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert slide.associated_images["thumbnail"].size == (1024, 768)


def test_other_settings_in_same_folder_are_refused(cohort: Path) -> None:
    with pytest.raises(ConfigError, match="other settings"):
        make_cohort(cohort, SynthConfig(n_slides=4, n_classes=2, size=SIZE, seed=4), progress=False)
