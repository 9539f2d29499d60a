"""Tiles decoded straight from a slide's own JPEG tiles, on the CPU or on a CUDA device.

``JpegTileSource`` serves Aperio SVS and generic tiled TIFF levels stored as JPEG tiles (see
``jpeg_tiff``) and follows the coordinate contract of docs/formats.md exactly as ``SlideReader.read_tiles``
does with OpenSlide: the level is ``best_level_for(size_level0 / out_px)`` of the OpenSlide geometry,
the region is ``ceil(size_level0 / ds)`` pixels at level coordinates ``(x / ds, y / ds)``, pixels
outside the image are white, and the region is resized with ``cv2.INTER_AREA``. At whole level
coordinates (every level-0 read) the pixels are identical to OpenSlide's. Where ``x / ds`` is
fractional, OpenSlide (through cairo) interpolates bilinearly with 7-bit weights; that is mirrored
here to within 2 grey levels (mean about 0.15). nvJPEG on a GPU is about one grey level from libjpeg.

Output tiles that straddle file tiles are assembled from them; each file tile is decoded once per
pass in grid order thanks to a small LRU cache of decoded tiles (a couple of tile rows; ``tile_cache``).

A damaged tile is a SlideReadError naming the file, level and tile, not wrong pixels: libjpeg only
warns where scan data do not fit the image (torchvision prints that on stderr and returns the pixels),
so each decoded tile is screened for the marks such damage leaves (``jpeg_tiff.scan_flaw``,
``grey_end``: microseconds), and the rare flagged tile is judged by OpenSlide and a probe decode.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from slidemil.errors import SlidemilError, SlideOpenError, SlideReadError
from slidemil.slide.jpeg_tiff import JpegLevel, TileFile, grey_end, open_jpeg_levels, scan_flaw, scan_leftover
from slidemil.slide.sources import TileSource, register_source
from slidemil.slide.tile_cache import Claim, LruTiles, acquire_file_cache, release_file_cache

if TYPE_CHECKING:
    from slidemil.slide.jpeg_device import EncodedTiles

log = logging.getLogger(__name__)

CACHE_MAX_BYTES = 256 * 2**20
WEIGHT_BITS = 7  # pixman's bilinear weights, as OpenSlide's cairo painting uses them
GPU_COLOUR_CHECK_TOLERANCE = 4.0  # mean abs grey levels between nvJPEG and libjpeg on one tile
REMEDY = "Copy the slide again from its source (compare checksums) or re-scan the glass slide"


@dataclass(frozen=True)
class _Plan:
    """Where each output tile's region lies on one level."""

    level: int
    size: int  # region side at the level, before resizing
    ix: np.ndarray  # int64 (B,) level x of the region's first source column
    iy: np.ndarray  # int64 (B,)
    wx: np.ndarray  # int64 (B,) 7-bit bilinear weight of the next column (0 = integer offset)
    wy: np.ndarray  # int64 (B,)

    @property
    def ext(self) -> int:
        """Extra source row/column needed for the sub-pixel shift."""
        return int(bool(self.wx.any() or self.wy.any()))


@register_source("jpeg")
class JpegTileSource(TileSource):
    """Decode the slide's JPEG tiles directly (torchvision ``decode_jpeg``; nvJPEG on a GPU).

    Args:
        path: slide file (Aperio SVS or generic tiled TIFF with JPEG tiles).
        mpp: level-0 microns per pixel given by the user (kept for the geometry reader).
        cache_tiles: decoded file tiles kept for output tiles that straddle them (shared by the
            sources open on the same file in this process); default four tile rows of the widest
            JPEG level plus 16, at most 256 MiB of pixels.

    Raises:
        SlideOpenError: the file is not such a slide, or none of its levels is JPEG-tiled.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, cache_tiles: int | None = None) -> None:
        self.path, self._mpp = Path(path), mpp
        self._reader, self._levels = open_jpeg_levels(self.path, mpp)
        if not any(self._levels):
            self._reader.close()
            raise SlideOpenError(f"{self.path.name}: no level is stored as tiled JPEG; use the openslide tile source")
        self._file = TileFile(self.path)
        self._cache_key: tuple[Any, ...] | None
        self._cache_key, self._cache = acquire_file_cache(self.path, cache_tiles or _default_capacity(self._levels))
        self._device_cache = LruTiles(self._cache.capacity)
        self._warned: set[int] = set()
        self._cpu_decode_levels: set[int] = set()  # levels whose nvJPEG colours failed the check
        self._checked_levels: set[int] = set()

    @classmethod
    def supports(cls, path: Path, size_level0: int, out_px: int) -> bool:
        """True when the level this tile size is read from is a JPEG-tiled page of an SVS/tiled TIFF."""
        try:
            reader, levels = open_jpeg_levels(Path(path), None)
        except SlidemilError:
            return False
        with reader:
            return levels[reader.best_level_for(size_level0 / out_px)] is not None

    @classmethod
    def prepare(cls) -> None:
        import openslide  # noqa: F401
        import tifffile  # noqa: F401
        import torchvision.io  # noqa: F401

    # -- CPU ---------------------------------------------------------------------------------
    def read(self, coords: np.ndarray, size_level0: int, out_px: int) -> np.ndarray:
        """uint8 (B, out_px, out_px, 3) RGB tiles at level-0 top-left ``coords`` (B, 2), decoded on the CPU."""
        coords = _check_coords(coords)
        plan = self._plan(coords, size_level0, out_px)
        level = self._levels[plan.level]
        if level is None:
            return self._fallback(plan.level).read_tiles(coords, size_level0, out_px)
        tiles = self._decoded(plan, level, device=None)
        out = np.empty((len(coords), out_px, out_px, 3), dtype=np.uint8)
        side = plan.size + plan.ext
        direct = plan.ext == 0 and plan.size == out_px
        scratch = None if direct else np.empty((side, side, 3), dtype=np.uint8)
        for i in range(len(coords)):
            region = out[i] if direct else scratch
            level.paste(int(plan.ix[i]), int(plan.iy[i]), side, tiles, region)
            if direct:
                continue
            assert region is not None  # the scratch buffer
            if plan.ext:
                region = _shift(region, int(plan.wx[i]), int(plan.wy[i]))
            if region.shape[0] != out_px:
                region = cv2.resize(region, (out_px, out_px), interpolation=cv2.INTER_AREA)
            out[i] = region
        return out

    # -- compressed (the device pipeline's reader side) -------------------------------------
    def fetch(self, coords: np.ndarray, size_level0: int, out_px: int,
              cpu_levels: Container[int] = ()) -> EncodedTiles | None:
        """The compressed file tiles a batch needs, for decoding elsewhere (``jpeg_device.decode_tiles``).

        Only file I/O and the byte screen of each stream (``scan_flaw``; a flagged tile is judged here,
        as ``read`` does) happen on this thread; nothing is decoded. None where the batch's level is not
        JPEG-tiled or is in ``cpu_levels`` (nvJPEG's colours failed there): read it with ``read``.
        """
        from slidemil.slide.jpeg_device import EncodedTiles

        coords = _check_coords(coords)
        plan = self._plan(coords, size_level0, out_px)
        level = self._levels[plan.level]
        if level is None or plan.level in cpu_levels:
            return None
        side = plan.size + plan.ext
        indices = [i for i in level.tiles_under(plan.ix.tolist(), plan.iy.tolist(), side) if level.counts[i]]
        data = [level.stream(self._file.read(int(level.offsets[i]), int(level.counts[i]))) for i in indices]
        for index, stream in zip(indices, data):
            flaw = scan_flaw(stream)
            if flaw is not None:
                self._confirm(plan.level, level, index, stream, flaw)
        return EncodedTiles(
            path=self.path, mpp=self._mpp, level_index=plan.level, level=level, size=plan.size, ix=plan.ix,
            iy=plan.iy, wx=plan.wx, wy=plan.wy, out_px=out_px, size_level0=size_level0, coords=coords,
            indices=np.asarray(indices, dtype=np.int64),
            streams=[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data])

    # -- device ------------------------------------------------------------------------------
    def read_device(self, coords: np.ndarray, size_level0: int, out_px: int,
                    device: str | torch.device = "cuda") -> torch.Tensor:
        """uint8 (B, out_px, out_px, 3) RGB tiles on ``device``: nvJPEG decode, crop and resize there.

        On a CPU device this is ``read`` wrapped in a tensor (same pixels).
        """
        device = torch.device(device)
        if device.type == "cpu":
            return torch.from_numpy(self.read(coords, size_level0, out_px))
        return self._read_torch(coords, size_level0, out_px, device)

    def _read_torch(self, coords: np.ndarray, size_level0: int, out_px: int, device: torch.device) -> torch.Tensor:
        """The device pipeline (assembly, shift and resize as tensor operations) on any device."""
        coords = _check_coords(coords)
        plan = self._plan(coords, size_level0, out_px)
        level = self._levels[plan.level]
        if level is None:
            tiles_np = self._fallback(plan.level).read_tiles(coords, size_level0, out_px)
            return torch.from_numpy(tiles_np).to(device, non_blocking=True)
        tiles = self._decoded(plan, level, device=device)
        side = plan.size + plan.ext
        batch = torch.empty((len(coords), side, side, 3), dtype=torch.uint8, device=device)
        for i in range(len(coords)):
            level.paste(int(plan.ix[i]), int(plan.iy[i]), side, tiles, batch[i])
        if plan.ext:
            wx = torch.as_tensor(plan.wx, device=device).view(-1, 1, 1, 1)
            wy = torch.as_tensor(plan.wy, device=device).view(-1, 1, 1, 1)
            batch = _shift(batch, wx, wy)
        if batch.shape[1] != out_px:
            batch = area_resize(batch, out_px)
        return batch.contiguous()

    # -- shared ------------------------------------------------------------------------------
    def _plan(self, coords: np.ndarray, size_level0: int, out_px: int) -> _Plan:
        level = self._reader.best_level_for(size_level0 / out_px)
        ds = self._reader.level_downsamples[level]
        size = max(1, math.ceil(size_level0 / ds - 1e-6))
        ix, wx = _level_axis(coords[:, 0], ds)
        iy, wy = _level_axis(coords[:, 1], ds)
        return _Plan(level, size, ix, iy, wx, wy)

    def _decoded(self, plan: _Plan, level: JpegLevel, device: torch.device | None) -> dict[int, Any]:
        """Every file tile the plan touches, decoded (HWC uint8; numpy on the CPU, tensors on a device)."""
        cache = self._cache if device is None else self._device_cache
        # Output tiles that are whole file tiles never share them: caching would only cost memory.
        aligned = (plan.ext == 0 and plan.size == level.tile_w == level.tile_h
                   and not (plan.ix % level.tile_w).any() and not (plan.iy % level.tile_h).any())
        tiles: dict[int, Any] = {}
        missing: list[int] = []
        waiting: list[tuple[int, Claim]] = []
        for index in level.tiles_under(plan.ix.tolist(), plan.iy.tolist(), plan.size + plan.ext):
            if level.counts[index] == 0:
                tiles[index] = None  # not stored: OpenSlide draws it transparent, i.e. white
                continue
            tile, claim = (None, None) if aligned else cache.claim((plan.level, index))
            if tile is not None:
                tiles[index] = tile
            elif claim is not None:
                waiting.append((index, claim))  # another thread is decoding it
            else:
                missing.append(index)
        decoded: list[Any] = [None] * len(missing)
        try:
            if missing:
                decoded = self._decode(plan.level, level, missing, device)
        finally:  # settle our claims (None on failure) before waiting on other threads': no deadlock
            for index, tile in zip(missing, decoded):
                tiles[index] = tile
                if not aligned:
                    cache.put((plan.level, index), tile)
        for index, claim in waiting:
            claim.done.wait()
            tiles[index] = claim.value if claim.value is not None else self._decode(plan.level, level, [index], device)[0]
        return tiles

    def _decode(self, level_index: int, level: JpegLevel, indices: list[int], device: torch.device | None) -> list[Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [level.stream(self._file.read(int(level.offsets[i]), int(level.counts[i]))) for i in indices]
        streams = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        on_gpu = device is not None and device.type != "cpu" and level_index not in self._cpu_decode_levels
        try:
            images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device if on_gpu else "cpu")
        except RuntimeError as exc:
            raise self._decode_error(level_index, level, indices, streams, exc) from exc
        if on_gpu and device is not None and level_index not in self._checked_levels:
            images = self._check_gpu_colours(level_index, streams, images, device)
        out = []
        for index, image, stream in zip(indices, images, data):
            if tuple(image.shape) != (3, level.tile_h, level.tile_w):
                raise SlideReadError(f"{self.path.name}: JPEG tile {index} of level {level_index} decodes to "
                                     f"{tuple(image.shape)}, not (3, {level.tile_h}, {level.tile_w}); the file is corrupt")
            hwc = image.permute(1, 2, 0)
            pixels = hwc.numpy() if hwc.device.type == "cpu" else None  # nvJPEG tiles: the byte screen only
            flaw = scan_flaw(stream) or (grey_end(pixels) if pixels is not None else None)
            if flaw is not None:
                self._confirm(level_index, level, index, stream, flaw)
            out.append(pixels if device is None else hwc.to(device, non_blocking=True))
        return out

    def _check_gpu_colours(self, level_index: int, streams: list[torch.Tensor], images: list[torch.Tensor],
                           device: torch.device) -> list[torch.Tensor]:
        """Compare one nvJPEG tile with libjpeg's once per level; decode on the CPU if colours differ.

        nvJPEG may not honour the Adobe transform flag of RGB JPEG; a wrong colour space shows as a
        mean error of tens of grey levels, an IDCT difference as about one.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        self._checked_levels.add(level_index)
        reference = decode_jpeg(streams[0], mode=ImageReadMode.RGB).to(device)
        error = (images[0].float() - reference.float()).abs().mean().item()
        if error <= GPU_COLOUR_CHECK_TOLERANCE:
            return images
        log.warning("%s: nvJPEG differs from libjpeg by %.1f grey levels on level %d; decoding it on the CPU",
                    self.path.name, error, level_index)
        self._cpu_decode_levels.add(level_index)
        return decode_jpeg(streams, mode=ImageReadMode.RGB)

    def _decode_error(self, level_index: int, level: JpegLevel, indices: list[int], streams: list[torch.Tensor],
                      exc: Exception) -> SlideReadError:
        """A SlideReadError naming the file and the first tile that fails to decode on its own."""
        from torchvision.io import ImageReadMode, decode_jpeg

        for index, stream in zip(indices, streams):
            try:
                decode_jpeg(stream, mode=ImageReadMode.RGB)
            except RuntimeError as single:
                where = self._where(level_index, level, index)
                problem = f"torchvision cannot decode it ({_first_line(single)})"
                verdict = self._openslide_verdict(level_index, level, index)
                if verdict is None:
                    return SlideReadError(f"{where}: {problem}, though OpenSlide reads it; read this slide with "
                                          "--tile-source openslide")
                return SlideReadError(f"{where} is corrupt: {problem}; OpenSlide fails on it too ({verdict}). {REMEDY}")
        return SlideReadError(f"{self.path.name}: JPEG tiles of level {level_index} cannot be decoded: "
                              f"{_first_line(exc)}; read this slide with --tile-source openslide")

    def _confirm(self, level_index: int, level: JpegLevel, index: int, stream: bytes, flaw: str) -> None:
        """Raise SlideReadError when a decoded tile that bears a mark of damage is damaged.

        libjpeg decodes scan data that do not fit the image with only a warning, which torchvision
        prints on stderr and drops (no exception, no Python warning), so the tile comes out wrong.
        ``scan_flaw`` and ``grey_end`` find the marks such damage leaves in microseconds. The few tiles
        they flag are decoded by OpenSlide, which fails where the data run out before the image is
        complete, and probed for data left over once it is (``scan_leftover``).
        """
        where = self._where(level_index, level, index)
        verdict = self._openslide_verdict(level_index, level, index)
        if verdict is not None:
            raise SlideReadError(f"{where} is corrupt: {flaw}, and OpenSlide fails on it ({verdict}). {REMEDY}")
        leftover = scan_leftover(stream, _decode_cpu)
        if leftover is not None:
            raise SlideReadError(f"{where} is corrupt: {flaw}, and {leftover}. {REMEDY}")
        log.debug("%s: tile %d of level %d: %s, but it decodes soundly", self.path.name, index, level_index, flaw)

    def _openslide_verdict(self, level_index: int, level: JpegLevel, index: int) -> str | None:
        """OpenSlide's error decoding file tile ``index`` of the level, or None when it decodes it."""
        row, col = divmod(index, level.tiles_across)
        # One pixel amid the tile's part of the image: OpenSlide decodes that tile and no other.
        x = (col * level.tile_w + min((col + 1) * level.tile_w, level.width)) // 2
        y = (row * level.tile_h + min((row + 1) * level.tile_h, level.height)) // 2
        ds = self._reader.level_downsamples[level_index]
        try:  # the reader's own level read: no level choice, no resizing
            self._reader._read_level(round(x * ds), round(y * ds), level_index, 1, 1)
        except SlideReadError as exc:
            return _first_line(exc.__cause__ or exc)
        return None

    def _where(self, level_index: int, level: JpegLevel, index: int) -> str:
        return (f"{self.path.name}: JPEG tile {index} of level {level_index} "
                f"(file offset {int(level.offsets[index])}, {int(level.counts[index])} bytes)")

    def _fallback(self, level: int) -> Any:
        if level not in self._warned:
            self._warned.add(level)
            log.info("%s: level %d is not JPEG-tiled; reading it through OpenSlide", self.path.name, level)
        return self._reader

    def close(self) -> None:
        if self._cache_key is not None:
            release_file_cache(self._cache_key)
            self._cache_key = None
        self._device_cache = LruTiles(1)
        self._file.close()
        self._reader.close()


def _first_line(exc: BaseException) -> str:
    """An exception's message without the C++ source location torch puts before it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^[\w ]*, \S+\.(?:cpp|h):\d+, ", "", text)


def _decode_cpu(data: bytes) -> np.ndarray | None:
    """(3, H, W) uint8 pixels of a JPEG stream decoded by libjpeg, or None where it fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).numpy()
    except RuntimeError:
        return None


def _default_capacity(levels: list[JpegLevel | None]) -> int:
    widest = max((lv for lv in levels if lv is not None), key=lambda lv: lv.tiles_across)
    rows = 4 * widest.tiles_across + 16  # two tile rows for each of a couple of reader threads
    return max(16, min(rows, CACHE_MAX_BYTES // (widest.tile_w * widest.tile_h * 3)))


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.int64)
    assert coords.ndim == 2 and coords.shape[1] == 2, f"coords must be (N, 2), got {coords.shape}"
    return coords


def _level_axis(c: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    """First level pixel and 7-bit weight of the next one for level-0 coordinates ``c`` (B,).

    As OpenSlide: ``c / ds`` in cairo's 16.16 fixed point; a negative ``c`` instead puts the image's
    first pixel at the whole-pixel offset ``trunc(-c / ds)`` (no sub-pixel shift).
    """
    fixed = np.rint(c / ds * 65536).astype(np.int64)
    first = fixed >> 16
    weight = (fixed & 0xFFFF) >> (16 - WEIGHT_BITS)
    negative = c < 0
    first[negative] = -np.trunc(-c[negative] / ds).astype(np.int64)
    weight[negative] = 0
    return first, weight


def _shift(region: Any, wx: Any, wy: Any) -> Any:
    """Bilinear sub-pixel shift by (wx, wy) / 128 px of (..., n+1, n+1, 3) uint8 to (..., n, n, 3).

    The integer arithmetic of pixman's bilinear filter (7-bit weights, truncation), which OpenSlide
    uses through cairo when a level coordinate is fractional.
    """
    one = 1 << WEIGHT_BITS
    wide = region.astype(np.int32) if isinstance(region, np.ndarray) else region.to(torch.int32)
    tl, tr = wide[..., :-1, :-1, :], wide[..., :-1, 1:, :]
    bl, br = wide[..., 1:, :-1, :], wide[..., 1:, 1:, :]
    top = tl * (one - wx) + tr * wx
    bottom = bl * (one - wx) + br * wx
    mixed = (top * (one - wy) + bottom * wy) >> (2 * WEIGHT_BITS)
    return mixed.astype(np.uint8) if isinstance(mixed, np.ndarray) else mixed.to(torch.uint8)


def area_resize(batch: torch.Tensor, out_px: int) -> torch.Tensor:
    """Resize uint8 (B, n, n, 3) to (B, out_px, out_px, 3) as ``cv2.INTER_AREA`` does, on the batch's device.

    INTER_AREA is separable, so it is two matrix products with OpenCV's own per-axis weights.
    ``F.interpolate(mode="area")`` uses whole-pixel windows instead and differs from OpenCV by several
    grey levels at the non-integer ratios that mpp conversion gives.
    """
    weights = _area_weights(batch.shape[1], out_px).to(batch.device)  # (out_px, n)
    x = batch.permute(0, 3, 1, 2).float()  # (B, 3, n, n)
    x = weights @ x @ weights.T
    return (x + 0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=16)
def _area_weights(n: int, m: int) -> torch.Tensor:
    """(m, n) float32: OpenCV's INTER_AREA weights along one axis, n pixels to m (its response to impulses)."""
    impulses = np.eye(n, dtype=np.float32)  # row k: an impulse at pixel k
    response = cv2.resize(impulses, (m, n), interpolation=cv2.INTER_AREA)  # (n, m)
    return torch.from_numpy(np.ascontiguousarray(response.T))


__all__ = ["JpegTileSource", "area_resize"]
