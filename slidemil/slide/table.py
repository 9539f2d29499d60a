"""The list of slides a batch command works on: a folder, a glob, or a CSV table.

A folder is searched recursively and a glob may use ``**``; multi-file formats (DICOM series, MRXS,
VMS/VMU) count once each (rules and slide ids: ``slidemil.slide.discovery``). A CSV has
``slide_id,path`` and optionally ``mpp`` (a per-slide override of microns per pixel); relative paths
are taken from the CSV's folder.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from slidemil.errors import LabelTableError
from slidemil.slide.discovery import SLIDE_SUFFIXES, find_by_glob, find_in_folder
from slidemil.slide.reader import slide_id_of

DUPLICATES_SHOWN = 5


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch: its id, file, and optional mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None


def load_slides(source: str | Path, slide_mpp: float | None = None) -> list[SlideEntry]:
    """Slides named by a folder, a glob pattern, or a CSV; ``slide_mpp`` overrides every slide's mpp.

    A folder is searched recursively and ``**`` in a glob spans folders; a DICOM series, an MRXS or a
    VMS/VMU slide stored as several files is one entry (see ``slidemil.slide.discovery``).

    Raises:
        LabelTableError: for an empty selection, a CSV without the needed columns, or duplicate ids.
    """
    text = str(source)
    path = Path(text)
    if path.suffix.lower() == ".csv" and path.is_file():
        entries = _from_csv(path)
    else:
        found = find_in_folder(path) if path.is_dir() else find_by_glob(text)
        entries = [SlideEntry(slide.slide_id, slide.path) for slide in found]
    if not entries:
        raise LabelTableError(f"no slides found in {text!r}: give a folder, a glob, or a CSV with slide_id,path")
    _check_unique_ids(entries)
    if slide_mpp is not None:
        entries = [SlideEntry(e.slide_id, e.path, slide_mpp) for e in entries]
    return entries


def _check_unique_ids(entries: list[SlideEntry]) -> None:
    """Raise when two entries share a slide id (outputs are named by id); linear in the number of slides.

    Raises:
        LabelTableError: naming the first duplicate ids with their files, and how to fix it.
    """
    counts = Counter(e.slide_id for e in entries)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if not dupes:
        return
    shown = set(dupes[:DUPLICATES_SHOWN])
    paths: dict[str, list[str]] = {}
    for e in entries:
        if e.slide_id in shown:
            paths.setdefault(e.slide_id, []).append(str(e.path))
    listing = "; ".join(f"{i!r}: {', '.join(paths[i])}" for i in dupes[:DUPLICATES_SHOWN])
    more = f" (and {len(dupes) - DUPLICATES_SHOWN} more)" if len(dupes) > DUPLICATES_SHOWN else ""
    raise LabelTableError(
        f"{len(dupes)} duplicate slide ids{more}: {listing}. Slide outputs are named by id: rename the files, "
        "or give a CSV with columns slide_id,path and a unique slide_id per row")


def _from_csv(path: Path) -> list[SlideEntry]:
    """Entries of a ``slide_id,path[,mpp]`` table; relative paths are from the table's folder."""
    table = pd.read_csv(path)
    if "path" not in table.columns:
        raise LabelTableError(f"{path}: needs a 'path' column (and 'slide_id'); has {list(table.columns)}")
    out = []
    for _, row in table.iterrows():
        file = Path(str(row["path"]))
        file = file if file.is_absolute() else path.parent / file
        default_id = slide_id_of(file)
        if file.is_dir():
            file, default_id = _single_slide_of(file, path)
        slide_id = str(row["slide_id"]) if "slide_id" in table.columns else default_id
        mpp = row.get("mpp")
        mpp = float(mpp) if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)) else None
        out.append(SlideEntry(slide_id, file, mpp))
    return out


def _single_slide_of(folder: Path, table: Path) -> tuple[Path, str]:
    """The file and id of the one slide a CSV row's folder holds (e.g. a DICOM series stored as a folder).

    Raises:
        LabelTableError: when the folder holds no slide or several.
    """
    found = find_in_folder(folder)
    if len(found) != 1:
        names = ", ".join(str(s.path) for s in found[:DUPLICATES_SHOWN]) or "none"
        raise LabelTableError(f"{table}: path {str(folder)!r} is a folder holding {len(found)} slides ({names}); "
                              "a row's path must be one slide: a slide file, or a folder of one DICOM series")
    return found[0].path, found[0].slide_id


def select_shard(entries: list[SlideEntry], shard: str | None) -> list[SlideEntry]:
    """The ``I/N`` shard of ``entries`` (0-based I): every slide in exactly one shard."""
    if not shard:
        return entries
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError as exc:
        raise LabelTableError(f"--shard {shard!r} must be I/N, e.g. 0/4") from exc
    if not 0 <= index < count:
        raise LabelTableError(f"--shard {shard!r}: need 0 <= I < N")
    return entries[index::count]


__all__ = ["SLIDE_SUFFIXES", "SlideEntry", "load_slides", "select_shard"]
