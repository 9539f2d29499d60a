"""Tile sources: where the uint8 pixels of a batch of tiles come from.

A source is opened per slide (and per worker thread: each has its own file handle) and reads
square tiles at level-0 coordinates, resized to the output size, exactly as the coordinate contract of
docs/formats.md says. ``reader`` reads through the slide reader (OpenSlide or a plain image); other
sources (decoding the file's own JPEG tiles, on the CPU or the GPU) register beside it and
``open_tile_source(kind="auto")`` picks the fastest that can serve the slide.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slidemil.slide.reader import SlideReader
from slidemil.slide.readers import open_slide

log = logging.getLogger(__name__)

# Registration order is the preference order of "auto".
SOURCES: dict[str, type[TileSource]] = {}


def register_source(name: str) -> Callable[[type[TileSource]], type[TileSource]]:
    """Class decorator adding a tile source to the registry."""
    def decorator(cls: type[TileSource]) -> type[TileSource]:
        cls.source_name = name
        SOURCES[name] = cls
        return cls
    return decorator


class TileSource(ABC):
    """Reads tiles of one slide. A context manager; not shared between threads."""

    source_name = "abstract"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        """Open the slide at ``path``; ``mpp`` overrides its level-0 microns per pixel."""

    @classmethod
    @abstractmethod
    def supports(cls, path: Path, size_level0: int, out_px: int) -> bool:
        """Whether this source can serve tiles of this size from this file."""

    @abstractmethod
    def read(self, coords: np.ndarray, size_level0: int, out_px: int) -> np.ndarray:
        """uint8 (B, out_px, out_px, 3) RGB tiles whose level-0 top-left corners are ``coords`` (B, 2)."""

    @classmethod
    def prepare(cls) -> None:
        """Import what reading needs (decoders, torch) now, not in a reader thread during the first slide."""

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> TileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@register_source("openslide")
class ReaderTileSource(TileSource):
    """Tiles through the slide reader (any format the readers open)."""

    def __init__(self, path: str | Path, mpp: float | None = None, reader: SlideReader | None = None) -> None:
        self._reader = reader if reader is not None else open_slide(path, mpp=mpp)

    @classmethod
    def supports(cls, path: Path, size_level0: int, out_px: int) -> bool:
        return True

    def read(self, coords: np.ndarray, size_level0: int, out_px: int) -> np.ndarray:
        return self._reader.read_tiles(coords, size_level0, out_px)

    def close(self) -> None:
        self._reader.close()


def open_tile_source(path: str | Path, mpp: float | None, size_level0: int, out_px: int,
                     kind: str = "auto") -> TileSource:
    """Open the tile source ``kind`` for a slide, or with ``auto`` the first registered one that supports it."""
    path = Path(path)
    _load_optional_sources()
    if kind != "auto":
        if kind not in SOURCES:
            from slidemil.errors import ConfigError
            raise ConfigError(f"unknown tile source {kind!r}; known: {sorted(SOURCES)} or auto")
        return SOURCES[kind](path, mpp=mpp)
    for name, cls in _preferred():
        if cls.supports(path, size_level0, out_px):
            log.debug("%s: tile source %s", path.name, name)
            return cls(path, mpp=mpp)
    return ReaderTileSource(path, mpp=mpp)


def prepare_tile_sources(kind: str = "auto") -> None:
    """Run ``prepare`` of the source ``kind`` (every source with ``auto``): start-up work, done once."""
    _load_optional_sources()
    for name, cls in SOURCES.items():
        if kind in ("auto", name):
            cls.prepare()


def _preferred() -> list[tuple[str, type[TileSource]]]:
    """Specialised sources first, the general reader last."""
    items = list(SOURCES.items())
    return [i for i in items if i[0] != "openslide"] + [i for i in items if i[0] == "openslide"]


def _load_optional_sources() -> None:
    import importlib
    for module in ("slidemil.slide.jpeg_source",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
