"""Tiles decoded straight from a slide's own JPEG tiles, on the CPU or on a CUDA device.

``JpegTileSource`` serves Aperio SVS and generic tiled TIFF levels stored as JPEG tiles (see
``jpeg_tiff``) and follows the reader contract of DESIGN.md exactly as ``SlideReader.read_tiles``
does with OpenSlide: the level is ``best_level_for(size_level0 / out_px)`` of the OpenSlide geometry,
the region is ``ceil(size_level0 / ds)`` pixels at level coordinates ``(x / ds, y / ds)``, pixels
outside the image are white, and the region is resized with ``cv2.INTER_AREA``. On aligned tiles
the pixels are identical to OpenSlide's. Where ``x / ds`` is fractional OpenSlide (through cairo)
interpolates bilinearly with 7-bit weights; that is mirrored here to within 1 grey level.

Output tiles that straddle file tiles are assembled from them; each file tile is decoded once per
pass in grid order thanks to a small LRU cache of decoded tiles (a couple of tile rows).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from slidemil.errors import SlidemilError, SlideOpenError, SlideReadError
from slidemil.slide.jpeg_tiff import JpegLevel, TileFile, probe_levels
from slidemil.slide.sources import TileSource, register_source

log = logging.getLogger(__name__)

TIFF_FORMATS = ("aperio", "generic-tiff")
CACHE_MAX_BYTES = 256 * 2**20
WEIGHT_BITS = 7  # pixman's bilinear weights, as OpenSlide's cairo painting uses them
GPU_COLOUR_CHECK_TOLERANCE = 4.0  # mean abs grey levels between nvJPEG and libjpeg on one tile


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


class _LruTiles:
    """Decoded file tiles keyed by (level, tile index), least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def get(self, key: tuple[int, int]) -> Any:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[int, int], value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


@register_source("jpeg")
class JpegTileSource(TileSource):
    """Decode the slide's JPEG tiles directly (torchvision ``decode_jpeg``; nvJPEG on a GPU).

    Args:
        path: slide file (Aperio SVS or generic tiled TIFF with JPEG tiles).
        mpp: level-0 microns per pixel given by the user (kept for the geometry reader).
        cache_tiles: decoded file tiles kept per level; default two tile rows of the widest JPEG
            level, capped at 256 MiB.

    Raises:
        SlideOpenError: the file is not such a slide, or none of its levels is JPEG-tiled.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, cache_tiles: int | None = None) -> None:
        self.path = Path(path)
        self._reader, self._levels = _probe(self.path, mpp)
        if not any(self._levels):
            self._reader.close()
            raise SlideOpenError(f"{self.path.name}: no level is stored as tiled JPEG; use the openslide tile source")
        self._file = TileFile(self.path)
        self._cache = _LruTiles(cache_tiles or _default_capacity(self._levels))
        self._device_cache = _LruTiles(self._cache.capacity)
        self._warned: set[int] = set()
        self._cpu_decode_levels: set[int] = set()  # levels whose nvJPEG colours failed the check
        self._checked_levels: set[int] = set()

    @classmethod
    def supports(cls, path: Path, size_level0: int, out_px: int) -> bool:
        """True when the level this tile size is read from is a JPEG-tiled page of an SVS/tiled TIFF."""
        try:
            reader, levels = _probe(Path(path), None)
        except SlidemilError:
            return False
        with reader:
            return levels[reader.best_level_for(size_level0 / out_px)] is not None

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
            _assemble(level, int(plan.ix[i]), int(plan.iy[i]), side, tiles, region)
            if direct:
                continue
            if plan.ext:
                region = _shift(region, int(plan.wx[i]), int(plan.wy[i]))
            if region.shape[0] != out_px:
                region = cv2.resize(region, (out_px, out_px), interpolation=cv2.INTER_AREA)
            out[i] = region
        return out

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
            _assemble(level, int(plan.ix[i]), int(plan.iy[i]), side, tiles, batch[i])
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
        tiles: dict[int, Any] = {}
        missing: list[int] = []
        for index in _tiles_touched(level, plan):
            hit = cache.get((plan.level, index))
            if hit is not None:
                tiles[index] = hit
            elif level.counts[index] == 0:
                tiles[index] = None  # not stored: OpenSlide draws it transparent, i.e. white
            else:
                missing.append(index)
        if missing:
            decoded = self._decode(plan.level, level, missing, device)
            for index, tile in zip(missing, decoded):
                cache.put((plan.level, index), tile)
                tiles[index] = tile
        return tiles

    def _decode(self, level_index: int, level: JpegLevel, indices: list[int], device: torch.device | None) -> list[Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        streams = [torch.frombuffer(bytearray(level.stream(self._file.read(int(level.offsets[i]), int(level.counts[i])))),
                                    dtype=torch.uint8) for i in indices]
        on_gpu = device is not None and device.type != "cpu" and level_index not in self._cpu_decode_levels
        try:
            images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device if on_gpu else "cpu")
        except RuntimeError as exc:
            raise self._decode_error(level_index, level, indices, streams, exc) from exc
        if on_gpu and level_index not in self._checked_levels:
            images = self._check_gpu_colours(level_index, streams, images, device)
        out = []
        for index, image in zip(indices, images):
            if tuple(image.shape) != (3, level.tile_h, level.tile_w):
                raise SlideReadError(f"{self.path.name}: JPEG tile {index} of level {level_index} decodes to "
                                     f"{tuple(image.shape)}, not (3, {level.tile_h}, {level.tile_w}); the file is corrupt")
            hwc = image.permute(1, 2, 0)
            if device is None:
                out.append(hwc.numpy())
            else:
                out.append(hwc.to(device, non_blocking=True))
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
                return SlideReadError(f"{self.path.name}: JPEG tile {index} of level {level_index} "
                                      f"(offset {int(level.offsets[index])}) cannot be decoded: {single}")
        return SlideReadError(f"{self.path.name}: JPEG tiles of level {level_index} cannot be decoded: {exc}")

    def _fallback(self, level: int) -> Any:
        if level not in self._warned:
            self._warned.add(level)
            log.info("%s: level %d is not JPEG-tiled; reading it through OpenSlide", self.path.name, level)
        return self._reader

    def close(self) -> None:
        self._cache.clear()
        self._device_cache.clear()
        self._file.close()
        self._reader.close()


def _probe(path: Path, mpp: float | None) -> tuple[Any, list[JpegLevel | None]]:
    """The OpenSlide reader (for geometry and level choice) and the JPEG level of each of its levels.

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


def _default_capacity(levels: list[JpegLevel | None]) -> int:
    widest = max((lv for lv in levels if lv is not None), key=lambda lv: lv.tiles_across)
    rows = 2 * widest.tiles_across + 16
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


def _tiles_touched(level: JpegLevel, plan: _Plan) -> list[int]:
    """Indices of the file tiles under the plan's regions, in first-use order."""
    side = plan.size + plan.ext
    seen: dict[int, None] = {}
    for x, y in zip(plan.ix.tolist(), plan.iy.tolist()):
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + side, level.width), min(y + side, level.height)
        if x0 >= x1 or y0 >= y1:
            continue
        for row in range(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1):
            for col in range(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1):
                seen[row * level.tiles_across + col] = None
    return list(seen)


def _assemble(level: JpegLevel, x: int, y: int, side: int, tiles: dict[int, Any], out: Any) -> None:
    """Fill ``out`` (side, side, 3; numpy or torch) with the level's pixels at (x, y); white outside."""
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + side, level.width), min(y + side, level.height)
    if x0 >= x1 or y0 >= y1 or x0 > x or y0 > y or x1 < x + side or y1 < y + side:
        out[...] = 255
    if x0 >= x1 or y0 >= y1:
        return
    th, tw = level.tile_h, level.tile_w
    for row in range(y0 // th, (y1 - 1) // th + 1):
        ty0, ty1 = max(y0, row * th), min(y1, (row + 1) * th)
        for col in range(x0 // tw, (x1 - 1) // tw + 1):
            tx0, tx1 = max(x0, col * tw), min(x1, (col + 1) * tw)
            tile = tiles[row * level.tiles_across + col]
            target = out[ty0 - y:ty1 - y, tx0 - x:tx1 - x]
            if tile is None:
                target[...] = 255
            else:
                target[...] = tile[ty0 - row * th:ty1 - row * th, tx0 - col * tw:tx1 - col * tw]


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

    Written as two matrix products with OpenCV's weights: shrinking averages each output pixel's
    exact footprint (fractional edges weighted), enlarging blends at most two neighbours.
    ``F.interpolate(mode="area")`` uses whole-pixel windows instead and differs from OpenCV by several
    grey levels at the non-integer ratios that mpp conversion gives.
    """
    weights = _area_weights(batch.shape[1], out_px, batch.device)  # (out_px, n)
    x = batch.permute(0, 3, 1, 2).float()  # (B, 3, n, n)
    x = weights @ x @ weights.T
    return (x + 0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _area_weights(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(m, n) float32 weights of OpenCV's INTER_AREA along one axis, n pixels to m."""
    scale = n / m
    if m <= n:  # share of input pixel j in output pixel i
        edges = torch.arange(m + 1, dtype=torch.float64) * scale
        j = torch.arange(n, dtype=torch.float64)[None, :]
        overlap = torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)
        return (overlap.clamp_(min=0) / scale).to(torch.float32).to(device)
    weights = torch.zeros((m, n), dtype=torch.float64)
    for i in range(m):  # OpenCV: the fraction of output pixel i past the input pixel boundary
        j = math.floor(i * scale)
        frac = (i + 1) - (j + 1) / scale
        frac = 0.0 if frac <= 0 else frac - math.floor(frac)
        if j + 1 < n:
            weights[i, j], weights[i, j + 1] = 1 - frac, frac
        else:
            weights[i, min(j, n - 1)] = 1.0
    return weights.to(torch.float32).to(device)


__all__ = ["JpegTileSource", "area_resize"]
