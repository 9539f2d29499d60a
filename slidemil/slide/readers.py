"""Concrete slide readers (OpenSlide for every WSI format it knows, and plain images) and ``open_slide``.

Registration order is the order ``open_slide`` tries them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import SlideOpenError, SlideReadError
from slidemil.slide.reader import READERS, SlideReader, register_reader, rgba_to_rgb_on_white, valid_mpp

log = logging.getLogger(__name__)

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
PLAIN_IMAGE_MAX_PIXELS = 20_000 * 20_000
UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "inch": 25_400.0, "2": 25_400.0, "3": 1e4}


@register_reader("openslide")
class OpenSlideReader(SlideReader):
    """Aperio, Hamamatsu, Leica, MIRAX, Philips, Ventana, Sakura, generic tiled TIFF and DICOM WSI."""

    _slide: Any  # openslide.OpenSlide while open, None once closed

    @classmethod
    def can_open(cls, path: Path) -> bool:
        import openslide
        try:
            return openslide.OpenSlide.detect_format(str(path)) is not None
        except openslide.OpenSlideError:
            return False

    def _open(self) -> None:
        import openslide
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideOpenError(f"{self.path.name}: OpenSlide cannot open it: {exc}") from exc
        props = self._slide.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_dimensions = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        power = props.get("openslide.objective-power")
        self.magnification = float(power) if power else None

    def _file_mpp(self) -> float | None:
        props = self._slide.properties
        mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        if mpp_x:
            x = float(mpp_x)
            y = float(mpp_y) if mpp_y else x
            if not math.isclose(x, y, rel_tol=0.02):
                log.warning("%s: anisotropic pixels (%.4f x %.4f um); using their mean", self.path.name, x, y)
            return valid_mpp((x + y) / 2)
        res, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit", "").lower()
        if res and unit in UM_PER_UNIT and float(res) > 0:
            return valid_mpp(UM_PER_UNIT[unit] / float(res))
        return None

    def _read_level(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        import openslide
        try:
            region = self._slide.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path.name}: OpenSlide cannot read pixels: {exc}") from exc
        return rgba_to_rgb_on_white(np.asarray(region))

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


@register_reader("image")
class PlainImageReader(SlideReader):
    """A plain PNG/JPEG/TIFF field of view, held in memory (one level; for small images only)."""

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return path.suffix.lower() in PLAIN_IMAGE_SUFFIXES

    def _open(self) -> None:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(self.path) as img:
                if img.width * img.height > PLAIN_IMAGE_MAX_PIXELS:
                    raise SlideOpenError(
                        f"{self.path.name}: {img.width}x{img.height} is too large for a plain image; "
                        "convert it to a pyramidal tiled TIFF (e.g. vips tiffsave --tile --pyramid)")
                self._dpi = img.info.get("dpi")
                self._resolution_unit = img.info.get("resolution_unit") if hasattr(img, "info") else None
                rgba = np.asarray(img.convert("RGBA"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise SlideOpenError(f"{self.path.name}: cannot open as an image: {exc}") from exc
        self._pixels = rgba_to_rgb_on_white(rgba)
        self.vendor = "image"
        self.level_dimensions = [(self._pixels.shape[1], self._pixels.shape[0])]
        self.level_downsamples = [1.0]

    def _file_mpp(self) -> float | None:
        if not self._dpi:
            return None
        dpi = float(self._dpi[0])
        # PIL reports dots per inch whatever the file's unit; 72/96 dpi are writer defaults, not scans.
        if dpi <= 0 or round(dpi) in (72, 96):
            return None
        return valid_mpp(25_400.0 / dpi)

    def _read_level(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        img_h, img_w = self._pixels.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img_w), min(y + h, img_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = np.empty((0, 0, 3), np.uint8)


def open_slide(path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> SlideReader:
    """Open ``path`` with the first registered reader that recognises it.

    ``slide_id`` names the slide (``reader.slide_id``) when it is not the file's name, as for a DICOM
    series found by ``load_slides``: pass ``entry.slide_id``.

    Raises:
        SlideOpenError: when no reader recognises the file or the recognising reader fails.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideOpenError(f"{path}: no such file")
    for cls in READERS.values():
        if cls.can_open(path):
            return cls(path, mpp=mpp, slide_id=slide_id)
    raise SlideOpenError(
        f"{path.name}: not a slide format slidemil can read (OpenSlide formats: SVS, NDPI, SCN, MRXS, "
        "BIF, tiled TIFF, DICOM; plain PNG/JPEG/TIFF images)")
