"""Synthetic cohorts of real Aperio SVS files with known tissue and lesion masks.

Used by the tests, the demo and the benchmarks. A slide is white glass with a few H&E-like
tissue blobs; slides of class k > 0 carry compact lesions with a class-specific look (see
:mod:`slidemil.slide.synth_texture`), covering ``lesion_fraction`` of the tissue.

File layout (OpenSlide opens it as vendor ``aperio``): one flat chain of IFDs,

1. level 0, tiled JPEG, with the Aperio ImageDescription (``|AppMag = ..|MPP = ..``);
2. the thumbnail, stripped JPEG, about 1024 px wide (an OpenSlide associated image);
3. levels at downsample 4 and 16, tiled JPEG, each only if at least one tile in both sides.

Pixels are given to tifffile as RGB; it stores them as JPEG with PhotometricInterpretation
YCbCr, chroma subsampling 2x2 (YCbCrSubSampling = (2, 2)) and ReferenceBlackWhite, which OpenSlide
decodes back to RGB. (Real Aperio files carry the same YCbCr 2x2 JPEG streams but label them RGB.)

Level 0 is painted in bands of one tile row and handed to tifffile tile by tile, so the full
image never sits in memory; the reduced levels, the thumbnail and the masks are accumulated
from the bands. Slide width is ``size``; height is ``size * 3 / 4`` rounded to whole tiles.
Truth masks have one pixel per ``mask_downsample`` (16) level-0 pixels, i.e. ``mask_mpp`` = 8
µm/px at 0.5 mpp; a mask pixel is set when at least half of its level-0 pixels are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from slidemil.atomic import atomic_path, remove_stale_temporaries, write_json, write_text
from slidemil.errors import ConfigError
from slidemil.slide.synth_layout import SlideLayout, plan_layout
from slidemil.slide.synth_svs import SlideAccumulator, write_svs
from slidemil.slide.synth_texture import NORMAL, BandPainter, Stain, lesion_params, render_texture

log = logging.getLogger(__name__)

TRUTH_SCHEMA = 1


@dataclass(frozen=True)
class SynthConfig:
    """Settings of a synthetic cohort.

    Attributes:
        n_slides: slides in the cohort (two per patient).
        n_classes: classes; class 0 is normal tissue, classes >= 1 carry lesions.
        size: level-0 width in px (a multiple of ``tile_size``); height is 3/4 of it, in whole tiles.
        lesion_fraction: fraction of the tissue area covered by lesions on slides of class >= 1.
        n_lesions: lesions per positive slide; None draws 2 to 4 per slide.
        subtle: lesions look closer to normal tissue (the difference stays visible).
        seed: everything follows from it; the same seed gives byte-identical files.
        mpp: level-0 microns per pixel written to the file.
        app_mag: nominal objective magnification written to the file.
        tile_size: TIFF tile edge in px (a multiple of 16).
        jpeg_quality: JPEG quality of every level.
        mask_downsample: level-0 px per truth-mask pixel (must divide ``tile_size``).
    """

    n_slides: int = 8
    n_classes: int = 2
    size: int = 8192
    lesion_fraction: float = 0.03
    n_lesions: int | None = None
    subtle: bool = False
    seed: int = 0
    mpp: float = 0.5
    app_mag: int = 20
    tile_size: int = 256
    jpeg_quality: int = 85
    mask_downsample: int = 16

    def slide_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`write_slide` that come from these settings."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("n_slides", "seed")}

    def __post_init__(self) -> None:
        if self.n_slides < 1 or self.n_classes < 1:
            raise ConfigError("SynthConfig needs n_slides >= 1 and n_classes >= 1")
        _check_geometry(self.size, self.tile_size, self.mask_downsample)
        if not 0 <= self.lesion_fraction < 0.5:
            raise ConfigError(f"lesion_fraction must be in [0, 0.5), got {self.lesion_fraction}")
        if self.n_lesions is not None and self.n_lesions < 1:
            raise ConfigError("n_lesions must be None or >= 1")


def _check_geometry(size: int, tile_size: int, mask_downsample: int) -> None:
    if tile_size % 16 or tile_size < 16:
        raise ConfigError(f"tile_size must be a multiple of 16, got {tile_size}")
    if size % tile_size or size < tile_size:
        raise ConfigError(f"size must be a positive multiple of tile_size={tile_size}, got {size}")
    if tile_size % mask_downsample:
        raise ConfigError(f"mask_downsample={mask_downsample} must divide tile_size={tile_size}")


@dataclass(frozen=True)
class SlideTruth:
    """What was painted on one slide.

    Attributes:
        width, height: level-0 size in px.
        label: the slide's class.
        mask_downsample: level-0 px per mask pixel; ``mask_mpp`` = mpp * mask_downsample.
        mask_mpp: microns per mask pixel.
        tissue: bool (height // mask_downsample, width // mask_downsample), true tissue.
        lesion: bool, same shape, lesion pixels (a subset of tissue).
        tissue_px, lesion_px: exact level-0 pixel counts.
        lesions: (x, y, radius) of each lesion in level-0 px (centre and mean radius).
    """

    width: int
    height: int
    label: int
    mask_downsample: int
    mask_mpp: float
    tissue: np.ndarray
    lesion: np.ndarray
    tissue_px: int
    lesion_px: int
    lesions: tuple[tuple[float, float, float], ...]

    @property
    def lesion_fraction(self) -> float:
        """Lesion area over tissue area, at level 0."""
        return self.lesion_px / max(self.tissue_px, 1)


def slide_height(size: int, tile_size: int) -> int:
    """Level-0 height for width ``size``: 3/4 of it, rounded to whole tiles."""
    return max(tile_size, round(size * 3 / 4 / tile_size) * tile_size)


def _draw_layout(
    rng: np.random.Generator,
    size: int,
    tile_size: int,
    label: int,
    n_lesions: int | None,
    lesion_fraction: float,
    cell: int,
) -> SlideLayout:
    """First draws of a slide's rng: the number of lesions, then the layout."""
    drawn = int(rng.integers(2, 5))
    k = 0 if label == 0 or lesion_fraction <= 0 else (n_lesions or drawn)
    return plan_layout(size, slide_height(size, tile_size), cell, k, lesion_fraction, rng)


def write_slide(
    path: str | Path,
    *,
    size: int,
    label: int,
    n_classes: int,
    lesion_fraction: float,
    rng: np.random.Generator,
    n_lesions: int | None = None,
    subtle: bool = False,
    mpp: float = 0.5,
    app_mag: int = 20,
    tile_size: int = 256,
    jpeg_quality: int = 85,
    mask_downsample: int = 16,
) -> SlideTruth:
    """Paint one synthetic slide and write it atomically as an Aperio SVS file.

    Args:
        path: output ``.svs`` path; written under a temporary name and renamed when complete.
        size: level-0 width in px; height is ``slide_height(size, tile_size)``.
        label: class of the slide; 0 has no lesions, ``k >= 1`` lesions of look ``k``.
        n_classes: number of classes (``label`` is checked against it).
        lesion_fraction: lesion area over tissue area on slides with ``label >= 1``.
        rng: the slide's own generator; the file is a pure function of its state and the arguments.
        n_lesions: number of lesions; None draws 2 to 4.
        subtle: lesions look closer to normal tissue.
        mpp, app_mag, tile_size, jpeg_quality: written to / used for the file.
        mask_downsample: level-0 px per truth-mask pixel.

    Returns:
        The truth of what was painted.
    """
    _check_geometry(size, tile_size, mask_downsample)
    if not 0 <= label < n_classes:
        raise ConfigError(f"label {label} is not in [0, {n_classes})")
    layout = _draw_layout(rng, size, tile_size, label, n_lesions, lesion_fraction, mask_downsample)
    stain = Stain.random(rng)
    tissue_tex = render_texture(NORMAL, stain, rng)
    lesion_tex = render_texture(lesion_params(label, subtle), stain, rng) if layout.lesions else None
    painter = BandPainter(layout, tissue_tex, lesion_tex, rng)
    acc = SlideAccumulator(layout.width, layout.height, tile_size, mask_downsample)
    with atomic_path(path) as tmp:
        write_svs(tmp, painter, acc, tile_size, jpeg_quality, mpp, app_mag)
    return SlideTruth(
        width=layout.width,
        height=layout.height,
        label=label,
        mask_downsample=mask_downsample,
        mask_mpp=mpp * mask_downsample,
        tissue=acc.tissue,
        lesion=acc.lesion,
        tissue_px=acc.tissue_px,
        lesion_px=acc.lesion_px,
        lesions=tuple((les.cx, les.cy, les.r0) for les in layout.lesions),
    )


def slide_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of slide ``index`` of a cohort: independent of the other slides."""
    return np.random.default_rng([seed, 0, index])


def cohort_table(cfg: SynthConfig) -> pd.DataFrame:
    """Slides, patients and labels of a cohort (no files touched).

    Two slides per patient share the patient's label; patients' labels cycle through the classes
    (balanced) in a seeded order. ``path`` is relative to the cohort folder.
    """
    n_patients = math.ceil(cfg.n_slides / 2)
    labels = np.arange(n_patients) % cfg.n_classes
    labels = np.random.default_rng([cfg.seed, 1]).permutation(labels)
    ids = [f"synth_{i:04d}" for i in range(cfg.n_slides)]
    return pd.DataFrame(
        {
            "slide_id": ids,
            "label": [int(labels[i // 2]) for i in range(cfg.n_slides)],
            "patient_id": [f"patient_{i // 2:04d}" for i in range(cfg.n_slides)],
            "path": [f"slides/{s}.svs" for s in ids],
        }
    )


def _write_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), mask.astype(np.uint8) * 255):
            raise OSError(f"cannot write {path}")


def _read_mask(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read {path}")
    return img > 127


def _slide_record(
    row: pd.Series, tissue: np.ndarray, lesion: np.ndarray, lesions: tuple[tuple[float, float, float], ...]
) -> dict[str, Any]:
    """Per-slide entry of truth.json; fractions measured on the masks (the same on a re-run)."""
    n_tissue = int(tissue.sum())
    return {
        "slide_id": row.slide_id,
        "label": int(row.label),
        "tissue_fraction": round(n_tissue / tissue.size, 6),
        "lesion_fraction": round(int(lesion.sum()) / max(n_tissue, 1), 6),
        "lesions": [{"x": round(x, 1), "y": round(y, 1), "radius": round(r, 1)} for x, y, r in lesions],
    }


def _make_one(out: Path, cfg: SynthConfig, index: int, row: pd.Series) -> dict[str, Any]:
    """Write (or find complete) one slide and its masks; return its truth.json entry."""
    svs = out / row.path
    lesion_png = out / "lesion_masks" / f"{row.slide_id}.png"
    tissue_png = out / "tissue_truth" / f"{row.slide_id}.png"
    if svs.exists() and lesion_png.exists() and tissue_png.exists():
        log.debug("%s exists, skipped", svs)
        layout = _draw_layout(
            slide_rng(cfg.seed, index),
            cfg.size,
            cfg.tile_size,
            int(row.label),
            cfg.n_lesions,
            cfg.lesion_fraction,
            cfg.mask_downsample,
        )
        lesions = tuple((les.cx, les.cy, les.r0) for les in layout.lesions)
        return _slide_record(row, _read_mask(tissue_png), _read_mask(lesion_png), lesions)
    truth = write_slide(svs, label=int(row.label), rng=slide_rng(cfg.seed, index), **cfg.slide_kwargs())
    _write_mask(lesion_png, truth.lesion)
    _write_mask(tissue_png, truth.tissue)
    return _slide_record(row, truth.tissue, truth.lesion, truth.lesions)


def _check_same_config(out: Path, cfg: SynthConfig) -> None:
    """Refuse to mix slides of other settings into a cohort folder (its truth.json says which)."""
    truth = out / "truth.json"
    if not truth.exists():
        return
    old = json.loads(truth.read_text()).get("config")
    if old != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise ConfigError(
            f"{out} holds a synthetic cohort made with other settings ({old}); "
            "write the new cohort to another folder or delete this one"
        )


def make_cohort(out_dir: str | Path, cfg: SynthConfig | None = None, progress: bool = True) -> pd.DataFrame:
    """Write a synthetic cohort to ``out_dir``; slides already complete there are kept.

    Writes ``slides/<slide_id>.svs``, ``lesion_masks/<slide_id>.png`` and
    ``tissue_truth/<slide_id>.png`` (uint8 0/255, one pixel per ``mask_downsample`` level-0 px),
    ``metadata.csv`` (slide_id, label, patient_id, path relative to ``out_dir``) and
    ``truth.json`` (mask resolution, the config, per-slide fractions and lesion centres).

    Args:
        out_dir: cohort folder (created if needed).
        cfg: cohort settings; defaults to ``SynthConfig()``.
        progress: show a progress bar.

    Raises:
        ConfigError: ``out_dir`` holds a cohort made with other settings.

    Returns:
        The metadata table, as written to ``metadata.csv``.
    """
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    _check_same_config(out, cfg)
    for sub in ("slides", "lesion_masks", "tissue_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        if removed := remove_stale_temporaries(out / sub):
            log.info("removed %d temporaries of an interrupted run in %s", removed, out / sub)
    table = cohort_table(cfg)
    records = []
    rows = tqdm(table.iterrows(), total=len(table), desc="synth slides", unit="slide", disable=not progress)
    for index, row in rows:
        records.append(_make_one(out, cfg, int(index), row))
    write_text(out / "metadata.csv", table.to_csv(index=False))
    write_json(
        out / "truth.json",
        {
            "schema": TRUTH_SCHEMA,
            "mask_mpp": cfg.mpp * cfg.mask_downsample,
            "mask_downsample": cfg.mask_downsample,
            "level0_mpp": cfg.mpp,
            "mask_rule": "a mask pixel is set when at least half of its level-0 pixels are",
            "config": dataclasses.asdict(cfg),
            "slides": records,
        },
    )
    log.info("synthetic cohort of %d slides in %s", len(table), out)
    return table
