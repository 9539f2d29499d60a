"""Sparse Deep Zoom (DZI) pyramids: the geometry, which tiles exist, and the ``.dzi`` descriptor.

A DZI image of ``W x H`` level-0 pixels has levels ``0 .. max_level`` with ``max_level =
ceil(log2(max(W, H)))``; level ``L`` is the image scaled by ``2 ** (L - max_level)`` (sizes rounded
up) and cut into ``tile_size`` squares, each with ``overlap`` extra pixels on its inner edges.
Tiles live at ``<id>_files/<L>/<col>_<row>.jpeg``.

slidemil writes a *sparse* pyramid, declared with the DZI ``DisplayRect`` mechanism (the Deep Zoom
format's way of saying where an image has content), so that any DZI viewer, and OpenSeadragon's
``DziTileSource.tileExists`` in particular, requests exactly the tiles that were written:

- **overview levels** (both sides at most ``overview_px``): every tile, glass included, so that the
  whole slide shows when zoomed out;
- **deeper levels** down to ``cap_level``: only tiles meeting a tissue rectangle (rectangles are
  unions of ``cap_level`` tiles; at coarser levels a tile exists when it meets one);
- **levels past ``cap_level``** (finer than ``--viewer-max-mpp``): none; a zero-sized rectangle marks
  them empty, and the viewer magnifies ``cap_level``.

``tile_exists`` repeats OpenSeadragon's arithmetic operation for operation (IEEE doubles, scales
that are powers of two), so the files on disk and the tiles the page asks for are the same set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

import numpy as np

DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"
OVERVIEW_PX = 1024


@dataclass(frozen=True)
class Rect:
    """A DZI ``DisplayRect``: level-0 pixels, present at levels ``min_level .. max_level``."""

    x: int
    y: int
    width: int
    height: int
    min_level: int
    max_level: int


@dataclass(frozen=True)
class DziGeometry:
    """Levels and tiles of a DZI image of ``width x height`` level-0 pixels."""

    width: int
    height: int
    tile_size: int = 510
    overlap: int = 1

    @property
    def max_level(self) -> int:
        """``ceil(log2(max(width, height)))``, in integers."""
        return max(0, (max(self.width, self.height) - 1).bit_length())

    def scale(self, level: int) -> float:
        """Level size over level-0 size: ``2 ** (level - max_level)`` (OpenSeadragon's ``getLevelScale``)."""
        return 1.0 / 2.0 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level`` in pixels (rounded up, as DZI writers do)."""
        s = self.scale(level)
        return max(1, math.ceil(self.width * s)), max(1, math.ceil(self.height * s))

    def n_tiles(self, level: int) -> tuple[int, int]:
        """(cols, rows) of ``level`` (OpenSeadragon's ``getNumTiles``)."""
        s = self.scale(level)
        return math.ceil(s * self.width / self.tile_size), math.ceil(s * self.height / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """Pixels ``(x0, y0, x1, y1)`` of a tile's image on ``level``, overlap included."""
        lw, lh = self.level_size(level)
        t, o = self.tile_size, self.overlap
        x0, y0 = max(0, col * t - o), max(0, row * t - o)
        return x0, y0, min(lw, (col + 1) * t + o), min(lh, (row + 1) * t + o)

    def mpp(self, level: int, slide_mpp: float) -> float:
        """Microns per pixel of ``level``."""
        return slide_mpp / self.scale(level)


@dataclass(frozen=True)
class PyramidPlan:
    """Which levels and tiles a sparse pyramid holds (module docstring)."""

    geometry: DziGeometry
    overview_level: int  # deepest level written whole
    cap_level: int  # deepest level written at all
    tissue: tuple[Rect, ...] = field(default_factory=tuple)

    @property
    def rects(self) -> list[Rect]:
        """The ``DisplayRect`` list of the ``.dzi``: whole image, tissue, empty levels."""
        g = self.geometry
        out = [Rect(0, 0, g.width, g.height, 0, min(self.overview_level, self.cap_level))]
        out += list(self.tissue)
        if self.cap_level > self.overview_level and not self.tissue:  # no tissue: deeper levels are empty
            out.append(Rect(0, 0, 0, 0, self.overview_level + 1, self.cap_level))
        if self.cap_level < g.max_level:
            out.append(Rect(0, 0, 0, 0, self.cap_level + 1, g.max_level))
        return out

    def tile_exists(self, level: int, col: int, row: int) -> bool:
        """OpenSeadragon's ``DziTileSource.tileExists`` for this plan's rectangles."""
        return bool(self.existing(level)[row, col])

    def existing(self, level: int) -> np.ndarray:
        """bool (rows, cols) of the tiles of ``level`` that exist (same arithmetic as ``tileExists``)."""
        g = self.geometry
        cols, rows = g.n_tiles(level)
        rects = [r for r in self.rects if r.min_level <= level <= r.max_level]
        if not rects:  # OpenSeadragon: a level without rectangles is whole (``rects`` covers every level)
            return np.ones((rows, cols), dtype=bool)
        out = np.zeros((rows, cols), dtype=bool)
        s, t = g.scale(level), g.tile_size
        for r in rects:
            x_min, y_min = r.x * s, r.y * s
            x_max, y_max = x_min + r.width * s, y_min + r.height * s
            c0, r0 = math.floor(x_min / t), math.floor(y_min / t)
            c1, r1 = math.ceil(x_max / t), math.ceil(y_max / t)
            out[max(0, r0):max(0, r1), max(0, c0):max(0, c1)] = True
        return out

    def levels(self) -> Iterator[int]:
        """Levels that hold at least one tile, coarsest first."""
        return iter(range(0, self.cap_level + 1))

    def n_tiles_written(self) -> dict[int, int]:
        """Tiles per level."""
        return {level: int(self.existing(level).sum()) for level in self.levels()}


def cap_level(geometry: DziGeometry, slide_mpp: float, max_mpp: float | None) -> int:
    """The coarsest level that still resolves ``max_mpp`` (``max_level`` when None or finer than the slide)."""
    top = geometry.max_level
    if max_mpp is None or not slide_mpp > 0 or max_mpp <= slide_mpp:
        return top
    steps = math.floor(math.log2(max_mpp / slide_mpp) + 1e-6)
    return max(0, top - steps)


def overview_level(geometry: DziGeometry, overview_px: int = OVERVIEW_PX) -> int:
    """The deepest level whose both sides are at most ``overview_px``."""
    level = 0
    while level < geometry.max_level and max(geometry.level_size(level + 1)) <= overview_px:
        level += 1
    return level


def tissue_rects(cells: np.ndarray, cell_px: int, geometry: DziGeometry, min_level: int, max_level: int,
                 ) -> tuple[Rect, ...]:
    """Rectangles covering the true cells of a (rows, cols) mask of ``cell_px`` level-0 squares.

    Runs of each row are merged with identical runs of the rows below, so a blob costs a few
    rectangles; each is clipped to the image.
    """
    rects: list[Rect] = []
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> first row
    padded = np.zeros((cells.shape[0] + 1, cells.shape[1] + 2), dtype=np.int8)
    padded[:-1, 1:-1] = cells
    for r in range(padded.shape[0]):
        edges = np.flatnonzero(np.diff(padded[r]))
        runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for run in [k for k in open_runs if k not in runs]:
            r0 = open_runs.pop(run)
            x, y = run[0] * cell_px, r0 * cell_px
            w, h = min(run[1] * cell_px, geometry.width) - x, min(r * cell_px, geometry.height) - y
            if w > 0 and h > 0:
                rects.append(Rect(x, y, w, h, min_level, max_level))
        for run in runs:
            open_runs.setdefault(run, r)
    return tuple(sorted(rects, key=lambda q: (q.y, q.x)))


def plan_pyramid(geometry: DziGeometry, tissue_cells: np.ndarray | None, slide_mpp: float,
                 max_mpp: float | None = None, overview_px: int = OVERVIEW_PX) -> PyramidPlan:
    """The sparse pyramid of a slide.

    Args:
        geometry: the DZI geometry of the slide.
        tissue_cells: bool mask on the grid of ``cap_level`` tiles (``cell_grid`` gives its shape and
            cell size), True where tiles are wanted; None writes every tile of every level.
        slide_mpp: level-0 microns per pixel.
        max_mpp: the finest resolution written; None for full resolution.
        overview_px: levels whose sides are all at most this are written whole.
    """
    cap = cap_level(geometry, slide_mpp, max_mpp)
    overview = min(overview_level(geometry, overview_px), cap)
    if tissue_cells is None:
        overview = cap
    rects: tuple[Rect, ...] = ()
    if cap > overview and tissue_cells is not None:
        rects = tissue_rects(tissue_cells, cell_grid(geometry, cap)[1], geometry, overview + 1, cap)
    return PyramidPlan(geometry, overview, cap, rects)


def cell_grid(geometry: DziGeometry, level: int) -> tuple[tuple[int, int], int]:
    """(rows, cols) of ``level``'s tile grid and the level-0 size of one of its tiles."""
    cols, rows = geometry.n_tiles(level)
    return (rows, cols), geometry.tile_size * 2 ** (geometry.max_level - level)


def dzi_json(plan: PyramidPlan, tiles_url: str, fmt: str = "jpeg") -> dict[str, object]:
    """The inline OpenSeadragon tile source (the ``.dzi`` as JSON, plus ``maxLevel``).

    ``maxLevel`` is given so that OpenSeadragon does not derive it with floating-point logarithms.
    """
    g = plan.geometry
    rects = [{"Rect": {"X": r.x, "Y": r.y, "Width": r.width, "Height": r.height, "MinLevel": r.min_level,
                       "MaxLevel": r.max_level}} for r in plan.rects]
    return {"Image": {"xmlns": DZI_XMLNS, "Url": tiles_url, "Format": fmt, "Overlap": str(g.overlap),
                      "TileSize": str(g.tile_size), "Size": {"Width": str(g.width), "Height": str(g.height)},
                      "DisplayRect": rects},
            "minLevel": 0, "maxLevel": g.max_level}


def dzi_xml(plan: PyramidPlan, fmt: str = "jpeg") -> str:
    """The ``.dzi`` descriptor, with its ``DisplayRects``."""
    g = plan.geometry
    rects = "".join(f'<DisplayRect MinLevel="{r.min_level}" MaxLevel="{r.max_level}"><Rect X="{r.x}" Y="{r.y}" '
                    f'Width="{r.width}" Height="{r.height}"/></DisplayRect>' for r in plan.rects)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns={quoteattr(DZI_XMLNS)} Format="{fmt}" '
            f'Overlap="{g.overlap}" TileSize="{g.tile_size}"><Size Width="{g.width}" Height="{g.height}"/>'
            f"<DisplayRects>{rects}</DisplayRects></Image>\n")
