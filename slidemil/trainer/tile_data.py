"""Bags of tiles read from the slides, for end-to-end training.

A slide's tiles are the grid of its coords file (``slidemil tile``: ``COORDS/coords/<slide_id>.h5``);
a bag is a seeded draw of them, read through the slide reader at the coords file's
``patch_size_level0`` and resized to its ``patch_size``, exactly as feature extraction and scoring
read them. Readers are opened lazily by the process that reads (each DataLoader worker has its own
handles; a dataset pickles without them) and kept open, at most :data:`MAX_OPEN` per process.

Where the slide files are: a ``path`` column of the label table (relative to its folder), else
``--slides`` (folder, glob or CSV), else the slides the coords folder was tiled from (its
``tiling_config.json`` records them).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from slidemil.artifacts.tiling_record import find_coords
from slidemil.errors import ConfigError, LabelTableError, StoreError
from slidemil.slide.reader import SlideReader
from slidemil.slide.readers import open_slide
from slidemil.slide.store import read_h5
from slidemil.slide.table import SlideEntry, load_slides
from slidemil.trainer.data import Bag, BagDataset, _listed, subsample

log = logging.getLogger(__name__)

MAX_OPEN = 32  # slide handles kept open per process


@dataclass(frozen=True)
class TileSource:
    """Where one slide's tiles come from."""

    slide: Path
    coords: Path
    mpp: float | None = None  # level-0 mpp override of the slide table


@dataclass(frozen=True)
class TileIndex:
    """What validation learned about each slide's tiles."""

    sources: dict[str, TileSource]
    n_tiles: dict[str, int]
    patch_size: int


class TileBagDataset(BagDataset):
    """Slides as bags of uint8 tiles (N, H, W, 3), read from the slide files.

    Args:
        slide_ids: slide ids.
        sources: one :class:`TileSource` per slide.
        labels: (S,) class indices.
        max_patches: tiles drawn per bag (training: per epoch; evaluation: one fixed subset); None: all.
        seed: seed of the draws.
    """

    def __init__(self, slide_ids: Sequence[str], sources: Sequence[TileSource], labels: np.ndarray,
                 max_patches: int | None = None, seed: int = 0) -> None:
        super().__init__(slide_ids, labels, seed)
        assert len(sources) == len(self.slide_ids)
        self.sources = list(sources)
        self.max_patches = max_patches
        self._grids: dict[int, tuple[np.ndarray, int, int]] = {}
        self._readers: OrderedDict[int, SlideReader] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # each process opens its own handles
        return state

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """Keyed by slide id, so a slide's evaluation subset is the same in every split and fold."""
        return np.random.default_rng([self.seed, epoch, zlib.crc32(self.slide_ids[index].encode())])

    def grid(self, index: int) -> tuple[np.ndarray, int, int]:
        """(coords int64 (N, 2), tile side in level-0 px, tile side in output px) of slide ``index``."""
        if index not in self._grids:
            bag = read_h5(self.sources[index].coords, load_features=False)
            self._grids[index] = (bag.coords, bag.attrs.patch_size_level0, bag.attrs.patch_size)
        return self._grids[index]

    def reader(self, index: int) -> SlideReader:
        """This process's open reader of slide ``index`` (least recently used handles are closed)."""
        if index in self._readers:
            self._readers.move_to_end(index)
            return self._readers[index]
        if len(self._readers) >= MAX_OPEN:
            _, oldest = self._readers.popitem(last=False)
            oldest.close()
        source = self.sources[index]
        reader = self._readers[index] = open_slide(source.slide, mpp=source.mpp)
        return reader

    def bag(self, index: int, epoch: int) -> Bag:
        """Tiles uint8 (N, H, W, 3) of the draw of ``epoch`` (sorted by position: reads stay local)."""
        coords, size0, px = self.grid(index)
        keep = subsample(len(coords), self.max_patches, self.rng(index, epoch))
        if keep is not None:
            coords = coords[keep]
        tiles = self.reader(index).read_tiles(coords, size0, px)
        return Bag(torch.from_numpy(tiles), int(self.labels[index]), index)

    def close(self) -> None:
        while self._readers:
            self._readers.popitem()[1].close()


def slide_entries(table: pd.DataFrame, metadata: str | Path, slides: str, coords_dir: Path) -> dict[str, SlideEntry]:
    """The slide file of every slide: the table's ``path`` column, ``slides``, or the coords folder's record.

    Raises:
        ConfigError: no source of slide paths, or one that names no slides.
    """
    if "path" in table.columns:
        base = Path(metadata).parent
        mpp = table["mpp"] if "mpp" in table.columns else pd.Series(np.nan, index=table.index)
        return {sid: SlideEntry(sid, p if (p := Path(str(path))).is_absolute() else base / p,
                                None if pd.isna(mpp[sid]) else float(mpp[sid]))
                for sid, path in table["path"].items() if isinstance(path, str) and path}
    source = slides
    if not source:
        record = coords_dir / "tiling_config.json"
        source = json.loads(record.read_text()).get("slides", "") if record.is_file() else ""
        if not source:
            raise ConfigError(f"where are the slides? {coords_dir} does not record them; give --slides "
                              "(folder, glob or CSV slide_id,path) or a path column in the label table")
        log.info("slides: %s (recorded by `slidemil tile` in %s)", source, record)
    try:
        entries = load_slides(source)
    except LabelTableError as exc:
        raise ConfigError(f"{exc}; give the slides with --slides (or a path column in the label table)") from exc
    return {e.slide_id: e for e in entries}


def check_tile_sources(slide_ids: Sequence[str], coords_dir: Path, entries: dict[str, SlideEntry],
                       skip_missing: bool, problems: list[str]) -> TileIndex:
    """Look at every slide's file and coords (attributes and shapes; no pixels read).

    Missing slide files, missing, unreadable or empty coords are problems, or dropped with a warning
    when ``skip_missing``; tile sizes that disagree are always a problem.
    """
    bad: dict[str, list[str]] = {"no slide file": [], "no coords file": [], "unreadable coords": [], "no tiles": []}
    sources, n_tiles, sizes = {}, {}, {}
    for sid in slide_ids:
        entry = entries.get(sid)
        path = find_coords(coords_dir, sid)
        if entry is None or not entry.path.is_file():
            bad["no slide file"].append(sid if entry is None else f"{sid} ({entry.path})")
            continue
        if not path.is_file():
            bad["no coords file"].append(sid)
            continue
        try:
            grid = read_h5(path, load_features=False)
        except StoreError as exc:
            bad["unreadable coords"].append(f"{sid} ({exc.__cause__ or exc})")
            continue
        if len(grid.coords) == 0:
            bad["no tiles"].append(sid)
            continue
        sources[sid] = TileSource(entry.path, path, entry.mpp)
        n_tiles[sid], sizes[sid] = len(grid.coords), grid.attrs.patch_size
    hints = {"no slide file": "give --slides or a path column",
             "no coords file": f"run `slidemil tile` into {coords_dir}",
             "unreadable coords": "delete them and re-run `slidemil tile`",
             "no tiles": "no tissue; drop them from the table"}
    for kind, ids in bad.items():
        if ids:
            text = f"{len(ids)} slide(s) with {kind}: {_listed(ids)} ({hints[kind]})"
            if skip_missing:
                log.warning("--skip-missing: dropping %s", text)
            else:
                problems.append(text + "; or pass --skip-missing")
    by_size = pd.Series(sizes, dtype=np.int64)
    if by_size.nunique() > 1:
        groups = {int(s): _listed(by_size.index[by_size == s].tolist()) for s in sorted(by_size.unique())}
        problems.append(f"tile sizes (patch_size) disagree between slides: {groups}; tile all slides with one setting")
    return TileIndex(sources, n_tiles, int(by_size.iloc[0]) if len(by_size) else 0)
