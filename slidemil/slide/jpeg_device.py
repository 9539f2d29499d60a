"""A batch of a slide's compressed JPEG tiles, decoded and assembled into output tiles on a device.

The reader side (``JpegTileSource.fetch``) reads the file tiles a batch of output tiles covers, with
their tables, and screens their bytes; this module does the rest where the tiles will be used:

1. ``decode_jpeg(list, device=...)``: every file tile of the batch in one call (batched nvJPEG on a
   CUDA device, libjpeg on the CPU);
2. assembly: one gather builds every output tile's region from the decoded file tiles (white off the
   image and where a tile is not stored), exactly as ``JpegLevel.paste`` does it on the CPU;
3. the sub-pixel shift of fractional level coordinates (pixman's integer arithmetic, ``_shift``) and
   the area resize (``area_resize``: OpenCV's own ``INTER_AREA`` weights as two matrix products).

On ``device="cpu"`` the same code runs and gives what ``JpegTileSource.read`` gives: steps 1 and 2
are bit-identical, the shift is the same integer arithmetic, and the resize is within one grey level
of OpenCV's (float sums in another order; see ``area_resize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slidemil.slide.jpeg_source import _shift, area_resize
from slidemil.slide.jpeg_tiff import JpegLevel


@dataclass(frozen=True)
class EncodedTiles:
    """What a batch of output tiles needs from one JPEG-tiled level, still compressed.

    ``indices`` are the stored file tiles the batch covers (row-major tile numbers of the level) and
    ``streams`` their decodable JPEG streams (uint8 CPU tensors), in the same order. ``path``, ``mpp``,
    ``coords``, ``size_level0`` and ``out_px`` let a consumer read the batch again on the CPU.
    """

    path: Path
    mpp: float | None
    level_index: int
    level: JpegLevel
    size: int  # region side at the level, before the shift and the resize
    ix: np.ndarray  # int64 (B,) level x of each region's first column
    iy: np.ndarray
    wx: np.ndarray  # int64 (B,) 7-bit weights of the sub-pixel shift
    wy: np.ndarray
    out_px: int
    size_level0: int
    coords: np.ndarray
    indices: np.ndarray  # int64 (K,)
    streams: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def ext(self) -> int:
        return int(bool(self.wx.any() or self.wy.any()))

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.streams)


def decode_streams(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 tiles on ``device``: one batched ``decode_jpeg`` call (nvJPEG on CUDA).

    Raises:
        RuntimeError: a stream the decoder refuses.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))


def assemble(batch: EncodedTiles, decoded: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 (B, out_px, out_px, 3) output tiles on ``device`` from the batch's decoded file tiles.

    One gather places every pixel: a region pixel at level (x, y) takes pixel (y mod th, x mod tw) of
    file tile (y div th, x div tw), or white off the image and where the tile is not stored (as
    OpenSlide draws it). Then the sub-pixel shift and the area resize, as ``JpegTileSource.read``.
    """
    level = batch.level
    th, tw = level.tile_h, level.tile_w
    side = batch.size + batch.ext
    white = torch.full((1, th, tw, 3), 255, dtype=torch.uint8, device=device)
    stacked = torch.cat([torch.stack([t.permute(1, 2, 0) for t in decoded]), white]) if decoded else white
    # Which decoded tile (slot) covers each (output tile, tile row, tile column) of its region: a small table.
    row0, col0 = batch.iy // th, batch.ix // tw  # floor division: negative offsets lie off the image
    span_r, span_c = (side + th - 1) // th + 1, (side + tw - 1) // tw + 1
    rows = row0[:, None] + np.arange(span_r)  # (B, R)
    cols = col0[:, None] + np.arange(span_c)  # (B, C)
    numbers = rows[:, :, None] * level.tiles_across + cols[:, None, :]  # (B, R, C)
    inside = ((rows >= 0) & (rows < level.tiles_down))[:, :, None] & ((cols >= 0) & (cols < level.tiles_across))[:, None, :]
    slots = np.full(numbers.shape, len(decoded), dtype=np.int64)  # the white tile comes last
    if len(batch.indices):
        order = np.argsort(batch.indices)
        known = batch.indices[order]
        at = np.searchsorted(known, numbers).clip(0, len(known) - 1)
        hit = inside & (known[at] == numbers)
        slots[hit] = order[at[hit]]
    if _aligned(batch, slots):  # every region is one whole stored file tile: no gather needed
        region = stacked[torch.as_tensor(slots[:, 0, 0], device=device)]
    else:
        region = _gather(batch, stacked, slots, row0, col0, side, device)
    if batch.ext:
        wx = torch.as_tensor(batch.wx, device=device).view(-1, 1, 1, 1)
        wy = torch.as_tensor(batch.wy, device=device).view(-1, 1, 1, 1)
        region = _shift(region, wx, wy)
    if region.shape[1] != batch.out_px:
        region = area_resize(region, batch.out_px)
    return region.contiguous()


def _aligned(batch: EncodedTiles, slots: np.ndarray) -> bool:
    level = batch.level
    return bool(batch.ext == 0 and batch.size == level.tile_w == level.tile_h
                and not (batch.ix % level.tile_w).any() and not (batch.iy % level.tile_h).any()
                and (batch.ix >= 0).all() and (batch.iy >= 0).all() and (batch.ix + batch.size <= level.width).all()
                and (batch.iy + batch.size <= level.height).all() and (slots[:, 0, 0] < len(batch.indices)).all())


def _gather(batch: EncodedTiles, stacked: torch.Tensor, slots: np.ndarray, row0: np.ndarray, col0: np.ndarray,
            side: int, device: torch.device) -> torch.Tensor:
    """(B, side, side, 3) regions: per pixel, its slot's flat offset, then one gather from the stacked tiles.

    Rows and columns off the image point at an extra all-white row and column of the slot table, so
    that the per-pixel work is one table lookup, two additions and the gather (int32 throughout).
    """
    level = batch.level
    th, tw = level.tile_h, level.tile_w
    n, span_r, span_c = slots.shape
    white = len(stacked) - 1
    table = np.full((n, span_r + 1, span_c + 1), white, dtype=np.int32)
    table[:, :span_r, :span_c] = slots
    table *= th * tw  # flat offset of each slot's first pixel
    r = torch.arange(side, device=device, dtype=torch.int32)
    ys = torch.as_tensor(batch.iy.astype(np.int32), device=device)[:, None] + r  # (B, side)
    xs = torch.as_tensor(batch.ix.astype(np.int32), device=device)[:, None] + r
    ti = torch.div(ys, th, rounding_mode="floor") - torch.as_tensor(row0.astype(np.int32), device=device)[:, None]
    tj = torch.div(xs, tw, rounding_mode="floor") - torch.as_tensor(col0.astype(np.int32), device=device)[:, None]
    ti = torch.where((ys >= 0) & (ys < level.height), ti, span_r)
    tj = torch.where((xs >= 0) & (xs < level.width), tj, span_c)
    b = torch.arange(n, device=device, dtype=torch.int32)[:, None, None]
    flat = torch.as_tensor(table, device=device)[b, ti[:, :, None], tj[:, None, :]]  # (B, side, side)
    flat += ((ys % th) * tw)[:, :, None]
    flat += (xs % tw)[:, None, :]
    return stacked.view(-1, 3)[flat]


def colour_error(decoded: torch.Tensor, stream: torch.Tensor) -> float:
    """Mean absolute difference in grey levels between a tile decoded on a device and libjpeg's decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    reference = decode_jpeg(stream, mode=ImageReadMode.RGB).to(decoded.device)
    return float((decoded.float() - reference.float()).abs().mean().item())


__all__ = ["EncodedTiles", "assemble", "colour_error", "decode_streams"]
