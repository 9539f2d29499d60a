"""Find the slides under a folder or matched by a glob, as labs store them.

A folder is searched recursively in sorted order, skipping hidden files and folders and the
temporary files slidemil writes (names containing ``TMP_MARK``). Formats stored as several files
are found once, by the file OpenSlide opens:

* DICOM WSI: the ``.dcm`` files of one directory are grouped by their SeriesInstanceUID (read from
  the header only). A series is one slide whose path is its highest-resolution VOLUME file (OpenSlide
  opens the whole series from it and finds the other levels, label and overview beside it). Its id:

  - a series of several files is named after its folder, or, when the folder holds several such
    series, the folder name plus ``_`` and the last 8 characters of the SeriesInstanceUID (the whole
    UID where two series of the folder share those 8 characters);
  - a series of a single file is named after the file, like any single-file slide.

  A ``.dcm`` file whose header cannot be read or carries no SeriesInstanceUID is listed on its own
  (named after the file), so that opening it later fails as a per-slide error row instead of the
  file disappearing from the batch. Files without a suffix (or with a numeric one, as in UID names)
  are read as DICOM when they start with the DICOM preamble; ``DICOMDIR`` index files are skipped.
* MIRAX: ``x.mrxs`` is the slide; its data folder ``x/`` (``Slidedat.ini``, ``Data*.dat``) is not
  searched.
* Hamamatsu VMS/VMU: ``x.vms``/``x.vmu`` is the slide; the image, map and optimisation files it names
  (JPEGs, NGRs) are not listed as slides of their own.

A glob may use ``**`` (any depth; matched here over the same cycle-safe walk, since the standard
library's recursive glob loops on a symlink cycle). A matched file that belongs to a multi-file slide gives that slide
(once, with the same id and path as folder discovery); a matched folder is searched like a folder.
"""

from __future__ import annotations

import configparser
import fnmatch
import glob
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from slidemil.atomic import TMP_MARK
from slidemil.errors import SlideOpenError
from slidemil.slide.reader import slide_id_of

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
                  ".dcm", ".png", ".jpg", ".jpeg"}
DICOM_SUFFIX = ".dcm"
MRXS_SUFFIX = ".mrxs"
VMS_SUFFIXES = {".vms", ".vmu"}
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
DICOM_INDEX_NAME = "DICOMDIR"
DICOM_HEADER_TAGS = ["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]
SERIES_SUFFIX_CHARS = 8
HEADER_DEFER_BYTES = 4096  # larger header values (ICC profiles, per-frame tables) are skipped, not loaded
GLOB_MAGIC = re.compile(r"[*?[]")


class FoundSlide(NamedTuple):
    """One slide found on disk: its id and the file a reader opens."""

    slide_id: str
    path: Path


@dataclass(frozen=True)
class _DicomHeader:
    """What grouping needs from one DICOM file's header."""

    series_uid: str
    is_volume: bool
    pixels: int


def find_in_folder(root: Path) -> list[FoundSlide]:
    """Every slide under ``root`` (recursive, sorted by path; hidden and temporary files skipped)."""
    found: dict[Path, FoundSlide] = {}
    for directory, names in _walk(root):
        for slide in _slides_of_directory(directory, names).values():
            found.setdefault(slide.path, slide)
    return sorted(found.values(), key=lambda s: str(s.path))


def find_by_glob(pattern: str) -> list[FoundSlide]:
    """The slides a glob pattern matches (``**`` spans folders), sorted by path.

    A matched file that belongs to a multi-file slide (a DICOM series, a VMS image, an MRXS data file)
    gives that slide; a matched folder is searched recursively; hidden and temporary files are skipped.
    """
    found: dict[Path, FoundSlide] = {}
    directories: dict[Path, dict[str, FoundSlide]] = {}
    searched: set[Path] = set()
    for text in sorted(_glob(pattern)):
        path = Path(text)
        if _is_skipped(path.name):
            continue
        owner = _mrxs_owner(path) if path.is_dir() else None
        if owner is not None:
            slides: Iterable[FoundSlide] = [FoundSlide(slide_id_of(owner), owner)]
        elif path.is_dir():
            if searched.intersection(path.parents):  # ``root/**`` matches every folder below root too
                continue
            searched.add(path)
            slides = find_in_folder(path)
        elif path.is_file():
            slides = [_slide_of_file(path, directories)]
        else:
            continue
        for slide in slides:
            found.setdefault(slide.path, slide)
    return sorted(found.values(), key=lambda s: str(s.path))


# -- walking ---------------------------------------------------------------------------------
def _tree(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` of ``root`` over visible entries: (directory, sorted sub-folders, sorted files).

    Symlinked folders are followed once each (a link back up the tree, or a second link to a folder
    already walked, is not entered again). Pruning the yielded sub-folder list in place stops the walk
    from entering them.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_skipped(d))
        names = sorted(n for n in filenames if not _is_skipped(n) and os.path.isfile(os.path.join(dirpath, n)))
        yield Path(dirpath), dirnames, names


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(directory, sorted visible file names) for ``root`` and every folder below it but MRXS data folders."""
    for directory, dirnames, names in _tree(root):
        mrxs_stems = {Path(n).stem for n in names if Path(n).suffix.lower() == MRXS_SUFFIX}
        dirnames[:] = [d for d in dirnames if d not in mrxs_stems]
        yield directory, names


def _glob(pattern: str) -> list[str]:
    """Paths matching ``pattern``; ``**`` matches any number of folders (none included), cycle-safe."""
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if GLOB_MAGIC.search(part))
    base, rest = Path(*parts[:first]) if first else Path("."), parts[first:]
    if not base.is_dir():
        return []
    matches = [str(base)] if first and _match_parts((), rest) else []  # ``a/**`` matches ``a`` itself
    for directory, dirnames, names in _tree(base):
        relative = directory.relative_to(base).parts
        matches.extend(str(directory / name) for name in [*dirnames, *names]
                       if _match_parts((*relative, name), rest))
    return matches


def _match_parts(parts: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Whether path components ``parts`` match glob components ``patterns`` (``**``: zero or more)."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match_parts(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _match_parts(parts[1:], patterns[1:])


def _is_skipped(name: str) -> bool:
    """Hidden files/folders and the temporaries of ``slidemil.atomic`` are never slides."""
    return name.startswith(".") or TMP_MARK in name


# -- one directory ---------------------------------------------------------------------------
def _slides_of_directory(directory: Path, names: list[str]) -> dict[str, FoundSlide]:
    """Each slide file of ``directory`` (by name) and the slide it belongs to.

    Members of a VMS/VMU slide map to the ``.vms``; DICOM files map to their series' slide; other
    files with a slide suffix map to themselves. Files that are not slides are absent.
    """
    out: dict[str, FoundSlide] = {}
    for name in names:
        if Path(name).suffix.lower() in VMS_SUFFIXES:
            index = directory / name
            slide = FoundSlide(slide_id_of(index), index)
            out[name] = slide
            for member in _vms_members(index):
                out.setdefault(member, slide)
    dicom = [n for n in names if n not in out and _is_dicom_candidate(directory / n)]
    out.update(_dicom_slides(directory, dicom))
    for name in names:
        if name not in out and Path(name).suffix.lower() in SLIDE_SUFFIXES:
            out[name] = FoundSlide(slide_id_of(directory / name), directory / name)
    return out


def _slide_of_file(path: Path, directories: dict[Path, dict[str, FoundSlide]]) -> FoundSlide:
    """The slide a single matched file belongs to (``directories`` caches per-directory results)."""
    owner = _mrxs_owner(path.parent)
    if owner is not None:
        return FoundSlide(slide_id_of(owner), owner)
    if path.parent not in directories:
        names = sorted(p.name for p in path.parent.iterdir() if not _is_skipped(p.name) and p.is_file())
        directories[path.parent] = _slides_of_directory(path.parent, names)
    slide = directories[path.parent].get(path.name)
    return slide if slide is not None else FoundSlide(slide_id_of(path), path)  # matched by the user: keep it


def _mrxs_owner(directory: Path) -> Path | None:
    """The ``.mrxs`` file whose data folder is ``directory``, or None."""
    for suffix in (MRXS_SUFFIX, MRXS_SUFFIX.upper()):
        candidate = directory.parent / f"{directory.name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _vms_members(index: Path) -> set[str]:
    """Names of the files beside a ``.vms``/``.vmu`` that its ini text refers to (images, map, ...)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(index.read_text(encoding="utf-8-sig", errors="replace"))
    except (OSError, configparser.Error) as exc:
        log.warning("%s: cannot read it as a VMS/VMU index (%s); its image files may be listed as slides", index, exc)
        return set()
    members = set()
    for section in parser.sections():
        for value in parser[section].values():
            name = value.strip().strip('"')
            if name and Path(name).name == name and (index.parent / name).is_file():
                members.add(name)
    return members


# -- DICOM series ----------------------------------------------------------------------------
def _is_dicom_candidate(path: Path) -> bool:
    """A ``.dcm`` file, or a file without a (non-numeric) suffix that starts with the DICOM preamble."""
    suffix = path.suffix.lower()
    if suffix == DICOM_SUFFIX:
        return True
    if path.name.upper() == DICOM_INDEX_NAME or (suffix and not suffix[1:].isdigit()):
        return False
    try:
        with path.open("rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def _dicom_slides(directory: Path, names: list[str]) -> dict[str, FoundSlide]:
    """Group the DICOM files ``names`` of ``directory`` into series; map each file to its series' slide."""
    out: dict[str, FoundSlide] = {}
    series: dict[str, list[tuple[str, _DicomHeader]]] = {}
    for name in names:
        header = _read_dicom_header(directory / name)
        if header is None:
            out[name] = FoundSlide(slide_id_of(directory / name), directory / name)
        else:
            series.setdefault(header.series_uid, []).append((name, header))
    multi = sorted(uid for uid, members in series.items() if len(members) > 1)
    suffixes = _series_suffixes(multi)
    for uid, members in series.items():
        best = min(members, key=lambda m: (not m[1].is_volume, -m[1].pixels, m[0]))[0]
        path = directory / best
        if len(members) == 1:
            slide_id = slide_id_of(path)
        else:
            folder = directory.resolve().name or slide_id_of(path)
            slide_id = folder if len(multi) == 1 else f"{folder}_{suffixes[uid]}"
        for name, _ in members:
            out[name] = FoundSlide(slide_id, path)
    return out


def _series_suffixes(uids: list[str]) -> dict[str, str]:
    """The id suffix of each series UID: its last 8 characters, the whole UID where those collide."""
    tails = {uid: uid[-SERIES_SUFFIX_CHARS:] for uid in uids}
    counts = Counter(tails.values())
    return {uid: tail if counts[tail] == 1 else uid for uid, tail in tails.items()}


def _read_dicom_header(path: Path) -> _DicomHeader | None:
    """Series UID, VOLUME flag and pixel count of a DICOM file (header only); None when unreadable."""
    try:
        import pydicom
    except ImportError as exc:
        raise SlideOpenError(f"{path}: grouping DICOM files into slides needs pydicom; "
                             "install it with pip install 'pydicom>=2.4'") from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=DICOM_HEADER_TAGS,
                            defer_size=HEADER_DEFER_BYTES)
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        image_type = [str(v).upper() for v in _as_list(ds.get("ImageType"))]
        pixels = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers; all mean "unreadable"
        log.warning("%s: DICOM header unreadable (%s); listed as a slide of its own", path, exc)
        return None
    if not uid:
        log.warning("%s: no SeriesInstanceUID in its DICOM header; listed as a slide of its own", path)
        return None
    return _DicomHeader(uid, "VOLUME" in image_type, pixels)


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


__all__ = ["SLIDE_SUFFIXES", "FoundSlide", "find_by_glob", "find_in_folder"]
