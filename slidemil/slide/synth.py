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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import tifffile
from tqdm.auto import tqdm

from slidemil.atomic import atomic_path, remove_stale_temporaries, write_json, write_text
from slidemil.errors import ConfigError
from slidemil.slide.synth_texture import (
    NORMAL,
    BandPainter,
    SlideLayout,
    Stain,
    lesion_params,
    plan_layout,
    render_texture,
)

log = logging.getLogger(__name__)

PYRAMID_DOWNSAMPLES = (4, 16)
THUMBNAIL_WIDTH = 1024
TRUTH_SCHEMA = 1
_APERIO_HEAD = "Aperio Image Library v12.0.5 \r\n"


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


def thumbnail_downsample(width: int, tile_size: int) -> int:
    """Power-of-two downsample that brings ``width`` nearest to 1024 px (at most ``tile_size``)."""
    t = 2 ** max(0, round(math.log2(max(width / THUMBNAIL_WIDTH, 1))))
    while tile_size % t:
        t //= 2
    return t


def _block_majority(mask: np.ndarray, cell: int) -> np.ndarray:
    """Bool (h // cell, w // cell): blocks in which at least half the pixels are set."""
    h, w = mask.shape
    counts = mask.reshape(h // cell, cell, w // cell, cell).sum(axis=(1, 3), dtype=np.int32)
    return 2 * counts >= cell * cell


class _Accumulator:
    """Collects, band by band, the reduced images and truth masks of a slide being painted."""

    def __init__(self, width: int, height: int, tile_size: int, cell: int) -> None:
        self.width, self.height, self.cell = width, height, cell
        self.thumb_ds = thumbnail_downsample(width, tile_size)
        self.images = {d: np.zeros((height // d, width // d, 3), np.uint8) for d in {4, self.thumb_ds}}
        self.tissue = np.zeros((height // cell, width // cell), bool)
        self.lesion = np.zeros_like(self.tissue)
        self.tissue_px = 0
        self.lesion_px = 0

    def add(self, y0: int, rgb: np.ndarray, tissue: np.ndarray, lesion: np.ndarray) -> None:
        """Take in level-0 rows ``y0 : y0 + len(rgb)`` (a multiple of 16 and of the mask cell)."""
        bh = rgb.shape[0]
        for d, img in self.images.items():
            size = (self.width // d, bh // d)
            img[y0 // d : (y0 + bh) // d] = (
                cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if d > 1 else rgb
            )
        rows = slice(y0 // self.cell, (y0 + bh) // self.cell)
        self.tissue[rows] = _block_majority(tissue, self.cell)
        self.lesion[rows] = _block_majority(lesion, self.cell)
        self.tissue_px += int(np.count_nonzero(tissue))
        self.lesion_px += int(np.count_nonzero(lesion))

    def level(self, downsample: int) -> np.ndarray:
        """The slide at ``downsample`` 4 or 16, uint8 (H/d, W/d, 3)."""
        if downsample == 4:
            return self.images[4]
        size = (self.width // downsample, self.height // downsample)
        return cv2.resize(self.images[4], size, interpolation=cv2.INTER_AREA)

    def thumbnail(self) -> np.ndarray:
        """The slide at ``thumb_ds``, about 1024 px wide, uint8."""
        return self.images[self.thumb_ds]


def _level0_tiles(painter: BandPainter, acc: _Accumulator, tile_size: int) -> Iterator[np.ndarray]:
    """Yield level-0 tiles (tile, tile, 3) in TIFF order, painting one band of tiles at a time."""
    for y0 in range(0, painter.layout.height, tile_size):
        rgb, tissue, lesion = painter.paint(y0, y0 + tile_size)
        acc.add(y0, rgb, tissue, lesion)
        for x0 in range(0, painter.layout.width, tile_size):
            yield rgb[:, x0 : x0 + tile_size]


def _descriptions(
    width: int, height: int, tile_size: int, quality: int, mpp: float, app_mag: int
) -> tuple[str, str, str]:
    """Aperio ImageDescriptions: level 0, thumbnail and reduced level (the last two are templates)."""
    keys = f"|AppMag = {app_mag}|MPP = {mpp:g}"
    base = f"{_APERIO_HEAD}{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size})"
    level0 = f"{base} JPEG/RGB Q={quality}{keys}"
    thumb = f"{_APERIO_HEAD}{width}x{height} -> {{w}}x{{h}} - {keys}"
    reduced = f"{base} -> {{w}}x{{h}} JPEG/RGB Q={quality}{keys}"
    return level0, thumb, reduced


def _write_svs(
    path: Path,
    painter: BandPainter,
    acc: _Accumulator,
    tile_size: int,
    quality: int,
    mpp: float,
    app_mag: int,
) -> None:
    """Write the IFD chain: level 0 (painted while written), thumbnail, reduced levels."""
    width, height = painter.layout.width, painter.layout.height
    desc0, desc_thumb, desc_level = _descriptions(width, height, tile_size, quality, mpp, app_mag)
    common = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "metadata": None,
        "software": False,
    }
    tile = (tile_size, tile_size)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        tw.write(
            _level0_tiles(painter, acc, tile_size),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=tile,
            description=desc0,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            **common,
        )
        thumb = acc.thumbnail()
        th, tw_ = thumb.shape[:2]
        tw.write(
            thumb, rowsperstrip=16 * math.ceil(th / 16), description=desc_thumb.format(w=tw_, h=th), **common
        )
        for d in PYRAMID_DOWNSAMPLES:
            if min(width, height) // d < tile_size:
                break
            img = acc.level(d)
            tw.write(
                img,
                tile=tile,
                subfiletype=0,
                description=desc_level.format(w=img.shape[1], h=img.shape[0]),
                **common,
            )


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
    acc = _Accumulator(layout.width, layout.height, tile_size, mask_downsample)
    with atomic_path(path) as tmp:
        _write_svs(tmp, painter, acc, tile_size, jpeg_quality, mpp, app_mag)
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
