"""One read interface over every slide format: OpenSlide formats and plain images.

Readers register themselves by name and are tried in order (``slidemil.slide.readers.open_slide``). Each reader is a
context manager with the slide's geometry, its microns per pixel, a thumbnail at a requested mpp,
and ``read_tiles`` which reads tiles at level-0 coordinates into a uint8 batch.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from slidemil.errors import MissingMppError, SlideOpenError, SlideReadError

log = logging.getLogger(__name__)

READERS: dict[str, type[SlideReader]] = {}

# Plausible range of a scanned slide's resolution; values outside are treated as "unknown"
# (72 dpi defaults written by image tools would otherwise claim 352 um/px).
MPP_RANGE = (0.05, 50.0)
THUMBNAIL_BAND_PX = 4096


def register_reader(name: str) -> Callable[[type[SlideReader]], type[SlideReader]]:
    """Class decorator adding a reader to the registry; readers are tried in registration order."""
    def decorator(cls: type[SlideReader]) -> type[SlideReader]:
        cls.reader_name = name
        READERS[name] = cls
        return cls
    return decorator


class SlideReader(ABC):
    """Read access to one slide. Subclasses open the file in ``_open`` and read in ``_read_level``.

    Args:
        path: slide file.
        mpp: microns per pixel at level 0 given by the user; overrides the file's value.
        slide_id: the slide's id when it is not the file's name (a DICOM series is named after its
            folder); default ``slide_id_of(path)``.
    """

    reader_name = "abstract"

    def __init__(self, path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or slide_id_of(self.path)
        self._mpp_override = mpp
        if not self.path.is_file():
            raise SlideOpenError(f"{self.path}: no such file")
        self._open()

    # -- subclass interface -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def can_open(cls, path: Path) -> bool:
        """Whether this reader recognises the file (cheap check, no full open)."""

    @abstractmethod
    def _open(self) -> None:
        """Open the file and fill ``level_dimensions``, ``level_downsamples``, ``vendor``."""

    @abstractmethod
    def _read_level(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level`` whose top-left is level-0 (x, y); outside is white."""

    @abstractmethod
    def _file_mpp(self) -> float | None:
        """Microns per pixel recorded in the file, or None."""

    def close(self) -> None:
        """Release the file handle."""

    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    vendor: str
    magnification: float | None = None

    # -- context manager and pickling (DataLoader workers reopen by path) -----------------
    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mpp": self._mpp_override, "slide_id": self.slide_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["mpp"], state.get("slide_id"))  # type: ignore[misc]

    # -- geometry -----------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel: the user's override, else the file's.

        Raises:
            MissingMppError: when neither exists, saying how to give one.
        """
        if self._mpp_override is not None:
            return float(self._mpp_override)
        mpp = self._file_mpp()
        if mpp is None:
            raise MissingMppError(
                f"{self.path.name}: the file records no microns per pixel; give it with --slide-mpp "
                "(all slides) or an 'mpp' column in the slide table (this slide)")
        return mpp

    def best_level_for(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (no resolution lost)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = level if ds >= self.level_downsamples[best] else best
        return best

    # -- pixels -------------------------------------------------------------------------
    def read_region(self, x: int, y: int, size_level0: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
        """Read a level-0 rectangle and resize it to ``out_size`` (w, h) with area interpolation."""
        w0, h0 = size_level0
        level = self.best_level_for(min(w0 / out_size[0], h0 / out_size[1]))
        ds = self.level_downsamples[level]
        w, h = max(1, math.ceil(w0 / ds - 1e-6)), max(1, math.ceil(h0 / ds - 1e-6))
        try:
            rgb = self._read_level(int(x), int(y), level, w, h)
        except SlideReadError:
            raise
        except Exception as exc:  # any backend failure becomes a typed error naming the file
            raise SlideReadError(f"{self.path.name}: cannot read pixels at ({x}, {y}) level {level}: {exc}") from exc
        if (w, h) != tuple(out_size):
            rgb = cv2.resize(rgb, tuple(out_size), interpolation=cv2.INTER_AREA)
        return rgb

    def read_tiles(self, coords: np.ndarray, size_level0: int, out_px: int) -> np.ndarray:
        """Read square tiles at level-0 top-left ``coords`` (N, 2) into uint8 (N, out_px, out_px, 3)."""
        coords = np.asarray(coords)
        assert coords.ndim == 2 and coords.shape[1] == 2, f"coords must be (N, 2), got {coords.shape}"
        out = np.empty((len(coords), out_px, out_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(coords):
            out[i] = self.read_region(int(x), int(y), (size_level0, size_level0), (out_px, out_px))
        return out

    def thumbnail(self, mpp: float | None = None, max_size: int | None = None) -> tuple[np.ndarray, float]:
        """RGB uint8 thumbnail at ``mpp`` microns per pixel (or fitting ``max_size``), and its mpp.

        Reads the best level in horizontal bands so that memory stays bounded for huge single-level files.
        """
        width, height = self.dimensions
        if mpp is not None:
            scale = self.mpp / mpp
        elif max_size is not None:
            scale = min(1.0, max_size / max(width, height))
        else:
            raise ValueError("give mpp or max_size")
        tw, th = max(1, round(width * scale)), max(1, round(height * scale))
        level = self.best_level_for(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        thumb = np.empty((th, tw, 3), dtype=np.uint8)
        band = max(1, THUMBNAIL_BAND_PX)
        for ly0 in range(0, lh, band):
            ly1 = min(lh, ly0 + band)
            ty0, ty1 = round(ly0 * th / lh), round(ly1 * th / lh)
            if ty1 <= ty0:
                continue
            try:
                strip = self._read_level(0, round(ly0 * ds), level, lw, ly1 - ly0)
            except Exception as exc:
                raise SlideReadError(f"{self.path.name}: cannot read level {level} for a thumbnail: {exc}") from exc
            thumb[ty0:ty1] = cv2.resize(strip, (tw, ty1 - ty0), interpolation=cv2.INTER_AREA)
        effective_mpp = self.mpp * width / tw if (mpp is not None or self._has_mpp()) else float("nan")
        return thumb, effective_mpp

    def _has_mpp(self) -> bool:
        return self._mpp_override is not None or self._file_mpp() is not None


def slide_id_of(path: Path) -> str:
    """Slide id of a file: its name without the (last) suffix."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def valid_mpp(value: float | None) -> float | None:
    """``value`` when it is a plausible slide resolution in um/px, else None."""
    if value is None or not math.isfinite(value) or not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        return None
    return float(value)


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 array on white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


__all__ = ["READERS", "SlideReader", "register_reader", "rgba_to_rgb_on_white", "slide_id_of", "valid_mpp"]
