"""The SVS file of a synthetic slide: Aperio's IFD chain written while level 0 is painted.

See :mod:`slidemil.slide.synth` for the layout of the file. ``SlideAccumulator`` collects, band by
band, what is written after level 0 (reduced levels, thumbnail) and the truth masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from slidemil.slide.synth_texture import BandPainter

PYRAMID_DOWNSAMPLES = (4, 16)
THUMBNAIL_WIDTH = 1024
_APERIO_HEAD = "Aperio Image Library v12.0.5 \r\n"


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


class SlideAccumulator:
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


def _level0_tiles(painter: BandPainter, acc: SlideAccumulator, tile_size: int) -> Iterator[np.ndarray]:
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


def write_svs(
    path: Path,
    painter: BandPainter,
    acc: SlideAccumulator,
    tile_size: int,
    quality: int,
    mpp: float,
    app_mag: int,
) -> None:
    """Write the IFD chain: level 0 (painted while written), thumbnail, reduced levels."""
    width, height = painter.layout.width, painter.layout.height
    desc0, desc_thumb, desc_level = _descriptions(width, height, tile_size, quality, mpp, app_mag)
    common: dict[str, Any] = {
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
