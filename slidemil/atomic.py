"""Atomic file output: write to a temporary name in the same folder, rename when complete.

A killed run leaves no half-written file under the final name, and a re-run can trust that a
file which exists is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary keeps the final suffix so that libraries choosing a format by suffix still work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_MARK}{final.stem}-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions of any new file
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_dir(final: str | os.PathLike[str]) -> Path:
    """A new folder beside ``final`` to build it in (renamed onto it when complete), with the permissions
    of any new folder (``mkdtemp`` makes 0700: a package or tile folder must be readable by others)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (shards of one job sharing a results table)."""
    import fcntl
    lock = Path(path).with_name(f".{Path(path).name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _json_default(obj: Any) -> Any:
    import dataclasses
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def remove_temporaries_of(path: str | os.PathLike[str]) -> int:
    """Delete temporaries that ``atomic_path(path)`` left behind when a run was killed; return how many.

    Only this exact file's temporaries match (``.tmp-<stem>-<8 random chars><suffix>``), so a
    temporary that another process is writing for another file is never touched.
    """
    import re
    final = Path(path)
    pattern = re.compile(rf"^{re.escape(TMP_MARK + final.stem)}-[a-z0-9_]{{8}}{re.escape(final.suffix)}$")
    count = 0
    if final.parent.is_dir():
        for p in final.parent.glob(f"{TMP_MARK}*"):
            if pattern.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                count += 1
    return count


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporaries left by a killed run in ``folder`` (recursively); return how many."""
    count = 0
    for p in Path(folder).rglob(f"{TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            count += 1
    return count
