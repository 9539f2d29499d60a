"""Write a sparse Deep Zoom pyramid (``slidemil.report.deepzoom``) of a slide with slidemil's reader.

Overview levels are cut from one overview image (``SlideReader.thumbnail``, read from the best
pyramid level in bands). Deeper levels are read with ``SlideReader.read_region`` (the best pyramid
level for the level's downsample, area-resized) in blocks of 4 x 4 tiles, only blocks holding a tile
that exists; each block also gives the tiles of the next two coarser levels (2 x 2 means), so the
slide's full resolution is decoded once. Tiles are JPEG. The tile folder is written under a temporary name and swapped
in whole; the ``.dzi`` is written last, so a folder beside a ``.dzi`` is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from slidemil.atomic import TMP_MARK, write_text
from slidemil.errors import SlideReadError
from slidemil.report.deepzoom import DziGeometry, PyramidPlan, dzi_xml
from slidemil.slide.reader import SlideReader

log = logging.getLogger(__name__)

READ_PX = 4608  # most source-level pixels a side of one read
GROUP = 2  # coarser levels cut from each read (blocks of 4 x 4 tiles of the level read)
FORMAT = "jpeg"


@dataclass(frozen=True)
class PyramidStats:
    """What ``write_pyramid`` wrote."""

    tiles: int
    bytes: int
    seconds: float
    per_level: dict[int, int]


def tiles_dir(out_dir: Path, slide_id: str) -> Path:
    """``<out_dir>/<id>_files``, the DZI tile folder."""
    return out_dir / f"{slide_id}_files"


def overview_image(reader: SlideReader, geometry: DziGeometry, level: int) -> np.ndarray:
    """RGB uint8 image of the whole slide at DZI ``level`` (exactly its size), from ``reader.thumbnail``."""
    lw, lh = geometry.level_size(level)
    thumb, _ = reader.thumbnail(max_size=max(lw, lh))
    if thumb.shape[:2] != (lh, lw):
        thumb = cv2.resize(thumb, (lw, lh), interpolation=cv2.INTER_AREA)
    return thumb


def _encode(tile: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError("JPEG encoding failed")
    return data.tobytes()


class _TileWriter:
    def __init__(self, root: Path, quality: int) -> None:
        self.root, self.quality = root, quality
        self.tiles = self.bytes = 0
        self._made: set[int] = set()

    def write(self, level: int, col: int, row: int, tile: np.ndarray) -> None:
        if level not in self._made:
            (self.root / str(level)).mkdir(parents=True, exist_ok=True)
            self._made.add(level)
        data = _encode(tile, self.quality)
        (self.root / str(level) / f"{col}_{row}.{FORMAT}").write_bytes(data)
        self.tiles += 1
        self.bytes += len(data)


def _write_overview_levels(plan: PyramidPlan, image: np.ndarray, writer: _TileWriter) -> None:
    g = plan.geometry
    for level in range(0, plan.overview_level + 1):
        lw, lh = g.level_size(level)
        img = image if (lw, lh) == (image.shape[1], image.shape[0]) else cv2.resize(
            image, (lw, lh), interpolation=cv2.INTER_AREA)
        for row, col in zip(*np.nonzero(plan.existing(level))):
            x0, y0, x1, y1 = g.tile_box(level, int(col), int(row))
            writer.write(level, int(col), int(row), img[y0:y1, x0:x1])


def _read(reader: SlideReader, box: tuple[int, int, int, int], inv: int) -> np.ndarray:
    """Pixels ``(x0, y0, x1, y1)`` of the level with ``inv`` level-0 px per px, in reads of at most
    ``READ_PX`` source pixels a side (a coarse level of a slide without a pyramid reads level 0)."""
    x0, y0, x1, y1 = box
    source = reader.level_downsamples[reader.best_level_for(inv)]
    step = max(1, int(READ_PX * source // inv))  # level px per read
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    for py in range(y0, y1, step):
        for px in range(x0, x1, step):
            w, h = min(step, x1 - px), min(step, y1 - py)
            out[py - y0:py - y0 + h, px - x0:px - x0 + w] = reader.read_region(px * inv, py * inv, (w * inv, h * inv),
                                                                             (w, h))
    return out


def _halve(img: np.ndarray) -> np.ndarray:
    """The next coarser level: the mean of each 2 x 2 pixels (an odd last row or column is repeated)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _write_group(reader: SlideReader, plan: PyramidPlan, base: int, low: int, writer: _TileWriter) -> None:
    """Levels ``base`` down to ``low`` from one read per block of ``2 ** (base - low)`` base tiles a side.

    Tile grids nest (a tile of level L covers 2 x 2 tiles of level L + 1), so a block read at ``base``
    with a margin of the overlap holds whole tiles of the coarser levels, made by halving it.
    """
    g = plan.geometry
    span = 2 ** (base - low)
    margin = g.overlap * span
    exists = {level: plan.existing(level) for level in range(low, base + 1)}
    rows, cols = exists[base].shape
    lw, lh = g.level_size(base)
    inv = 2 ** (g.max_level - base)
    for br in range(0, rows, span):
        for bc in range(0, cols, span):
            if not exists[base][br:br + span, bc:bc + span].any():
                continue  # a coarser tile exists only where one of its base tiles does
            x0, y0 = max(0, bc * g.tile_size - margin), max(0, br * g.tile_size - margin)
            x1, y1 = min(lw, (bc + span) * g.tile_size + margin), min(lh, (br + span) * g.tile_size + margin)
            img = _read(reader, (x0, y0, x1, y1), inv)
            for level in range(base, low - 1, -1):
                f = 2 ** (base - level)
                ox, oy = x0 // f, y0 // f
                block = exists[level][br // f:(br + span) // f, bc // f:(bc + span) // f]
                for dr, dc in zip(*np.nonzero(block)):
                    row, col = br // f + int(dr), bc // f + int(dc)
                    tx0, ty0, tx1, ty1 = g.tile_box(level, col, row)
                    writer.write(level, col, row, img[ty0 - oy:ty1 - oy, tx0 - ox:tx1 - ox])
                if level > low:
                    img = _halve(img)


def _write_sparse_levels(reader: SlideReader, plan: PyramidPlan, writer: _TileWriter) -> None:
    """Levels below the overview, ``GROUP + 1`` at a time from reads of the deepest of them."""
    base = plan.cap_level
    while base > plan.overview_level:
        low = max(base - GROUP, plan.overview_level + 1)
        _write_group(reader, plan, base, low, writer)
        base = low - 1


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``tmp`` (the old one is moved aside, then removed)."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_MARK}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(out_dir: Path, slide_id: str) -> None:
    """Temporary tile folders a killed run left for ``slide_id``."""
    for p in out_dir.glob(f"{TMP_MARK}*{slide_id}_files*"):
        shutil.rmtree(p, ignore_errors=True)


def write_pyramid(reader: SlideReader, plan: PyramidPlan, out_dir: str | Path, slide_id: str, quality: int = 80,
                  overview: np.ndarray | None = None) -> PyramidStats:
    """Write ``<out_dir>/<id>_files/<level>/<col>_<row>.jpeg`` for the tiles of ``plan``, then ``<id>.dzi``.

    Args:
        reader: the open slide; its level-0 size must be the plan's.
        plan: levels and tiles to write.
        out_dir: folder of the pyramid.
        slide_id: names the files.
        quality: JPEG quality.
        overview: ``overview_image(reader, plan.geometry, plan.overview_level)`` when the caller already has it.

    Raises:
        SlideReadError: the slide's pixels cannot be read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = plan.geometry
    if tuple(reader.dimensions) != (g.width, g.height):
        raise SlideReadError(f"{reader.path.name}: level-0 size {reader.dimensions} is not the pyramid's "
                             f"{(g.width, g.height)}")
    start = time.perf_counter()
    remove_stale(out, slide_id)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{slide_id}_files-", dir=out))
    try:
        writer = _TileWriter(tmp, quality)
        _write_overview_levels(plan, overview if overview is not None else overview_image(reader, g, plan.overview_level), writer)
        _write_sparse_levels(reader, plan, writer)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the folder is served like any other
        _swap_in(tmp, tiles_dir(out, slide_id))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text(out / f"{slide_id}.dzi", dzi_xml(plan, FORMAT))
    stats = PyramidStats(writer.tiles, writer.bytes, time.perf_counter() - start, plan.n_tiles_written())
    log.debug("%s: %d tiles, %.1f MB in %.1f s", slide_id, stats.tiles, stats.bytes / 1e6, stats.seconds)
    return stats
