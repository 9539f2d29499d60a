"""The JPEG tiles of a TIFF-family slide (Aperio SVS, generic tiled TIFF): byte streams and layout.

OpenSlide's levels are matched to the file's tiled pages by their dimensions (tifffile's SVS series
also hold the thumbnail, label and macro pages, which OpenSlide does not count as levels). A level
is served here when its page is tiled, 8-bit, 3-sample, chunky, and JPEG compressed (TIFF
compression 7); anything else (JPEG 2000, LZW, ...) stays with OpenSlide.

Each tile's stream is the page's shared ``JPEGTables`` without their EOI followed by the tile
without its SOI. Photometric RGB tiles (Aperio writes RGB JPEG without the YCbCr transform) get an
Adobe APP14 segment with transform 0 right after SOI, and lose any JFIF APP0 or other APP14, so that
decoders do not apply a YCbCr conversion: OpenSlide decodes them as RGB because the TIFF says so.
``JpegLevel`` also knows which file tiles a region covers and pastes decoded tiles into it.
``scan_flaw``, ``grey_end`` and ``scan_leftover`` help tell damaged tile streams from sound ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidemil.errors import SlideOpenError, SlideReadError

if TYPE_CHECKING:
    import tifffile

TIFF_FORMATS = ("aperio", "generic-tiff")  # OpenSlide formats whose levels are TIFF pages
JPEG_COMPRESSION = 7
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6
SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
SOS = 0xDA
SOS_MARKER = b"\xff\xda"
APP0 = 0xE0
APP14 = 0xEE
# APP14 "Adobe": version 100, flags0 0, flags1 0, transform 0 (components are RGB, not YCbCr).
ADOBE_RGB_SEGMENT = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
# 256 zero bits: never in the scans of our slides coded with standard Huffman tables (runs of at most
# 4 bytes there); zeroed file ranges are sectors long.
ZERO_RUN = bytes(32)
MID_GREY = 128  # a JPEG block whose coefficients are all zero
FILLER = 0xAA  # probe bytes: 10101010 is no marker
PROBE_BYTES = 32
_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # a marker other than RSTn (FF 00 is a stuffed FF)


@dataclass(frozen=True)
class JpegLevel:
    """Geometry and tile table of one JPEG-tiled pyramid level."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # int64 (n_tiles,) file offset of each tile, row-major
    counts: np.ndarray  # int64 (n_tiles,) byte count of each tile; 0 = tile not stored
    tables: bytes | None  # JPEGTables shared by the tiles (SOI ... EOI), or None
    rgb: bool  # photometric RGB: the tiles carry RGB components, not YCbCr

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)

    def tiles_under(self, xs: list[int], ys: list[int], side: int) -> list[int]:
        """Indices of the file tiles under squares of ``side`` px at level (x, y), in first-use order."""
        seen: dict[int, None] = {}
        for x, y in zip(xs, ys):
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, self.width), min(y + side, self.height)
            if x0 < x1 and y0 < y1:
                for row in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
                    for col in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                        seen[row * self.tiles_across + col] = None
        return list(seen)

    def paste(self, x: int, y: int, side: int, tiles: dict[int, Any], out: Any) -> None:
        """Fill ``out`` (side, side, 3; numpy or torch) from decoded HWC ``tiles``; white off the image.

        Pixels of edge tiles beyond the image are not used: OpenSlide clips them (transparent = white).
        A tile given as None (not stored in the file) is white too.
        """
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, self.width), min(y + side, self.height)
        if x0 >= x1 or y0 >= y1 or x0 > x or y0 > y or x1 < x + side or y1 < y + side:
            out[...] = 255
        if x0 >= x1 or y0 >= y1:
            return
        th, tw = self.tile_h, self.tile_w
        for row in range(y0 // th, (y1 - 1) // th + 1):
            ty0, ty1 = max(y0, row * th), min(y1, (row + 1) * th)
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tx0, tx1 = max(x0, col * tw), min(x1, (col + 1) * tw)
                tile = tiles[row * self.tiles_across + col]
                target = out[ty0 - y:ty1 - y, tx0 - x:tx1 - x]
                target[...] = 255 if tile is None else tile[ty0 - row * th:ty1 - row * th, tx0 - col * tw:tx1 - col * tw]

    def stream(self, raw: bytes) -> bytes:
        """The decodable JPEG stream of one tile's stored bytes."""
        data = self.tables[:-2] + raw[2:] if self.tables else raw
        return rgb_jpeg(data) if self.rgb else data


def open_jpeg_levels(path: Path, mpp: float | None) -> tuple[Any, list[JpegLevel | None]]:
    """The OpenSlide reader of an SVS/generic TIFF (geometry, level choice) and each level's JPEG tiles.

    Raises:
        SlideOpenError: when the file is not an SVS/generic TIFF that OpenSlide and tifffile open.
    """
    import openslide
    import tifffile

    from slidemil.slide.readers import OpenSlideReader

    try:
        vendor = openslide.OpenSlide.detect_format(str(path)) if path.is_file() else None
    except openslide.OpenSlideError:
        vendor = None
    if vendor not in TIFF_FORMATS:
        raise SlideOpenError(f"{path.name}: not an SVS or generic tiled TIFF (OpenSlide format {vendor!r})")
    reader = OpenSlideReader(path, mpp=mpp)
    try:
        return reader, probe_levels(path, reader.level_dimensions)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        reader.close()
        raise SlideOpenError(f"{path.name}: tifffile cannot read its pages: {exc}") from exc


def probe_levels(path: str | Path, level_dimensions: list[tuple[int, int]]) -> list[JpegLevel | None]:
    """For each level size (width, height), the JPEG-tiled page of that size, or None.

    Raises:
        tifffile.TiffFileError, OSError: when the file is not a TIFF tifffile can read.
    """
    import tifffile

    out: list[JpegLevel | None] = []
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
        for width, height in level_dimensions:
            page = next((p for p in pages if (p.imagewidth, p.imagelength) == (width, height)), None)
            out.append(_jpeg_level(page) if page is not None else None)
    return out


def _jpeg_level(page: tifffile.TiffPage) -> JpegLevel | None:
    """The page as a JpegLevel when it holds 8-bit RGB/YCbCr JPEG tiles, else None."""
    p = page  # tifffile.TiffPage
    if (int(p.compression) != JPEG_COMPRESSION or int(p.photometric) not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)
            or p.samplesperpixel != 3 or p.bitspersample != 8 or p.imagedepth != 1 or p.tiledepth != 1
            or int(p.planarconfig) != 1):
        return None
    level = JpegLevel(
        width=int(p.imagewidth), height=int(p.imagelength), tile_w=int(p.tilewidth), tile_h=int(p.tilelength),
        offsets=np.asarray(p.dataoffsets, dtype=np.int64), counts=np.asarray(p.databytecounts, dtype=np.int64),
        tables=bytes(p.jpegtables) if p.jpegtables else None, rgb=int(p.photometric) == PHOTOMETRIC_RGB)
    if len(level.offsets) != level.tiles_across * level.tiles_down:
        return None
    return level


def rgb_jpeg(data: bytes) -> bytes:
    """``data`` with an Adobe APP14 transform-0 segment after SOI and no JFIF/other APP14 segment."""
    if data[:2] != SOI:
        return data  # not a JPEG: let the decoder report it
    keep = [SOI, ADOBE_RGB_SEGMENT]
    pos = start = 2
    # Walk the marker segments up to the start of scan; only APP0/APP14 are dropped.
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == SOS:
            break
        seg_end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (APP0, APP14):
            keep.append(data[start:pos])
            start = seg_end
        pos = seg_end
    keep.append(data[start:])
    return b"".join(keep)


def scan_flaw(data: bytes) -> str | None:
    """The mark of damage on a JPEG stream's entropy-coded data, or None: a byte search, not a decode.

    libjpeg only *warns* where a scan's data do not fit its image, and decodes on (torchvision prints
    the warning on stderr and returns the wrong pixels). Damage that causes this leaves marks found in
    microseconds: inside scan data no marker may stand but restart markers (an FF is stuffed as FF 00),
    and a long run of zero bytes is what a zeroed range of a file leaves. Sound tiles can bear them too
    (a flat tile coded with optimised Huffman tables is all zero bits; a multi-scan JPEG has markers
    between its scans): a real decoder decides.
    """
    bounds = _scan_bounds(data)
    if isinstance(bounds, str):
        return bounds
    start, stop = bounds
    zeros = data.find(ZERO_RUN, start, stop)
    if zeros >= 0:
        return f"a run of {len(ZERO_RUN)}+ zero bytes in its scan data (stream byte {zeros})"
    marker = _SCAN_MARKER.search(data, start, stop)
    if marker is not None:
        return f"marker 0xFF{marker.group()[1]:02X} inside its scan data (stream byte {marker.start()})"
    return None


def grey_end(tile: np.ndarray) -> str | None:
    """The mark of scan data cut short on a decoded tile (HWC uint8), or None.

    Where a scan's data run out, libjpeg leaves every later block with all coefficients zero, uniform
    mid-grey (128), and only warns. A last block of exactly that grey is the mark (tile sides are
    multiples of 16, so that block is the last MCU's own); a sound tile ending in flat grey 128 bears
    it too, and a real decoder clears it.
    """
    if tile[-1, -1, 0] == MID_GREY and (tile[-8:, -8:] == MID_GREY).all():  # one pixel first: fast
        return "its last 8 x 8 block is the uniform grey libjpeg leaves where the data run out"
    return None


def scan_leftover(data: bytes, decode: Callable[[bytes], Any]) -> str | None:
    """Whether the image of a JPEG stream is complete before its scan data end: one probe decode.

    libjpeg then warns ("extraneous bytes before marker") and returns the pixels, as OpenSlide does
    (it stops reading after the last row). Its decoder reads every byte of sound data, so changing the
    last bytes changes the pixels; here it never reads them, and the pixels stay as they are.

    Args:
        data: a stream that ``decode`` decodes without an error.
        decode: JPEG bytes -> pixels as a numpy array (None where the decoder fails).

    Returns:
        What is wrong, or None when the decoder reads the data to their end (or they are too short to tell).
    """
    bounds = _scan_bounds(data)
    if isinstance(bounds, str):
        return bounds
    start, stop = bounds
    # The bytes after the last FF of the data (so as to make no marker), PROBE_BYTES at most.
    tail = max(start, data.rfind(b"\xff", start, stop) + 2, stop - PROBE_BYTES)
    if stop - tail < 8:  # too few to tell real bits from the last byte's padding
        return None
    other = FILLER if data[tail:stop] != bytes([FILLER]) * (stop - tail) else FILLER >> 1
    if _same(decode(data[:tail] + bytes([other]) * (stop - tail) + data[stop:]), decode(data)):
        return "the decoder never reaches the end of its data"
    return None


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and np.array_equal(a, b)


def _scan_bounds(data: bytes) -> tuple[int, int] | str:
    """(start, stop) of a stream's entropy-coded data, or what is missing.

    ``start`` follows the first start-of-scan header, found by a search rather than a walk of the
    segments (a few times faster): an FF DA followed by a length of 6 + 2 x (1 to 4 components).
    ``stop`` is the last EOI marker.
    """
    pos = data.find(SOS_MARKER)
    while pos >= 0:
        length, components = int.from_bytes(data[pos + 2:pos + 4], "big"), data[pos + 4:pos + 5]
        if components and 1 <= components[0] <= 4 and length == 6 + 2 * components[0]:
            stop = data.rfind(EOI, pos + 2 + length)
            return (pos + 2 + length, stop) if stop >= 0 else "no end-of-image marker"
        pos = data.find(SOS_MARKER, pos + 2)
    return "no start-of-scan header"


class TileFile:
    """Positional reads of tile bytes from one open file (no shared file position between calls)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._size = os.fstat(self._fd).st_size

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset``.

        Raises:
            SlideReadError: when the file ends before them (a truncated slide).
        """
        assert self._fd is not None, "file is closed"
        if offset < 0 or offset + count > self._size:
            raise SlideReadError(
                f"{self.path.name}: tile data at offset {offset} (+{count} bytes) lies beyond the end of the "
                f"file ({self._size} bytes); the file is truncated or corrupt")
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SlideReadError(f"{self.path.name}: short read at offset {offset}; the file is truncated")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["ADOBE_RGB_SEGMENT", "JpegLevel", "TileFile", "grey_end", "open_jpeg_levels", "probe_levels", "rgb_jpeg",
           "scan_flaw", "scan_leftover"]
