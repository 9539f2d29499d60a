"""The list of slides a batch command works on: a folder, a glob, or a CSV table.

A CSV has ``slide_id,path`` and optionally ``mpp`` (a per-slide override of microns per pixel);
relative paths are taken from the CSV's folder.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from slidemil.errors import LabelTableError
from slidemil.slide.reader import slide_id_of

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
                  ".dcm", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch: its id, file, and optional mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None


def load_slides(source: str | Path, slide_mpp: float | None = None) -> list[SlideEntry]:
    """Slides named by a folder, a glob pattern, or a CSV; ``slide_mpp`` overrides every slide's mpp.

    Raises:
        LabelTableError: for an empty selection, a CSV without the needed columns, or duplicate ids.
    """
    text = str(source)
    path = Path(text)
    if path.suffix.lower() == ".csv" and path.is_file():
        entries = _from_csv(path)
    elif path.is_dir():
        entries = [SlideEntry(slide_id_of(p), p) for p in sorted(path.iterdir())
                   if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES]
    else:
        entries = [SlideEntry(slide_id_of(Path(p)), Path(p)) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    if not entries:
        raise LabelTableError(f"no slides found in {text!r}: give a folder, a glob, or a CSV with slide_id,path")
    ids = [e.slide_id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise LabelTableError(f"duplicate slide ids {dupes[:5]}: give a CSV with unique slide_id values")
    if slide_mpp is not None:
        entries = [SlideEntry(e.slide_id, e.path, slide_mpp) for e in entries]
    return entries


def _from_csv(path: Path) -> list[SlideEntry]:
    table = pd.read_csv(path)
    if "path" not in table.columns:
        raise LabelTableError(f"{path}: needs a 'path' column (and 'slide_id'); has {list(table.columns)}")
    out = []
    for _, row in table.iterrows():
        file = Path(str(row["path"]))
        file = file if file.is_absolute() else path.parent / file
        slide_id = str(row["slide_id"]) if "slide_id" in table.columns else slide_id_of(file)
        mpp = row.get("mpp")
        mpp = float(mpp) if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)) else None
        out.append(SlideEntry(slide_id, file, mpp))
    return out


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
