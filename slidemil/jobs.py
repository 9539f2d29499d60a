"""The per-slide job that ``tile``, ``extract`` and ``score`` share: what is left to do, a guarded result
row per slide, and a results table that shards of one job write together.

The results table is a CSV with one row per slide (``status`` ``ok`` or ``error`` with the message).
Each row is appended as one line under a file lock, so recording a slide costs the same at the
10,000th slide as at the first, and shards (Slurm array tasks) append to one table safely. The last
row of a slide wins; the table is compacted (one row per slide, in first-seen order) when a run
opens and closes it, with an optional JSON copy beside it. Readers see whole lines: every line is
written by a single ``write``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from slidemil.atomic import atomic_path, file_lock, remove_temporaries_of
from slidemil.errors import SlidemilError
from slidemil.processes import worker_context
from slidemil.slide.table import SlideEntry

log = logging.getLogger(__name__)

Row = dict[str, Any]
TableT = TypeVar("TableT", bound="ResultsTable")
TEXT_COLUMNS = frozenset({"slide_id", "status", "error", "pred_class"})


# -- one slide's row ---------------------------------------------------------------------------------
def error_text(exc: BaseException) -> str:
    """A failure as its row states it: slidemil's own message (it names the fix), else the type and message."""
    return str(exc) if isinstance(exc, SlidemilError) else f"{type(exc).__name__}: {exc}"


FAILURES = (SlidemilError, OSError, ValueError, RuntimeError)  # third-party readers and runners raise these


def guarded(work: Callable[[SlideEntry], Row], entry: SlideEntry) -> Row:
    """``work(entry)`` as a result row: status ok, or status error with the message; never raises."""
    start = time.perf_counter()
    try:
        row = {"status": "ok", "error": "", **work(entry)}
    except FAILURES as exc:
        log.warning("%s: %s", entry.slide_id, error_text(exc))
        row = {"status": "error", "error": error_text(exc)}
    return {"slide_id": entry.slide_id, **row, "seconds": round(time.perf_counter() - start, 3)}


# -- the table ---------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    """CSV text of a value: floats as ``repr`` (what pandas writes), missing and non-finite as empty."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _parse(column: str, text: str) -> Any:
    """A cell read back: text columns as text, others as int, float or text ('' -> None)."""
    if column in TEXT_COLUMNS:
        return text
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class ResultsTable:
    """The per-slide results table of a job (``tiling.csv``, ``extraction.csv``, ``predictions.csv``).

    Args:
        path: the CSV file.
        columns: the columns every row may have, in order; keys a row brings beyond them are added
            after them, sorted.
        json_path: also write the compacted table as JSON (``{"columns", "rows", **json_extra}``).
        json_extra: fields added to the JSON (e.g. the class names).
    """

    def __init__(self, path: str | Path, columns: Sequence[str], json_path: str | Path | None = None,
                 json_extra: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.fixed = list(columns)
        self.json_path = Path(json_path) if json_path is not None else None
        self.json_extra = dict(json_extra or {})
        self.header: list[str] = []
        self.rows: dict[str, Row] = {}
        self.compact()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, slide_id: str) -> Row | None:
        """The row of ``slide_id`` (the last one recorded), or None."""
        return self.rows.get(slide_id)

    def is_ok(self, slide_id: str) -> bool:
        return (self.rows.get(slide_id) or {}).get("status") == "ok"

    def record(self, row: Row) -> None:
        """Append ``row`` (a new slide, or a slide's newer result): one line, under the table's lock."""
        row = self.normalise(row)
        self.rows[str(row["slide_id"])] = row
        with file_lock(self.path):
            remove_temporaries_of(self.path)  # left by a killed writer; none is being written now
            on_disk = self._read_header()
            if on_disk is None or not set(row) <= set(on_disk):
                self._rewrite(self._read_rows(), extra=row)
                return
            line = self._line(on_disk, row).encode("utf-8")
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer killed mid-line: end that line
                    line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)
            self.header = on_disk

    append = record

    def normalise(self, row: Row) -> Row:
        """``row`` as the table holds it (and reads it back): every fixed column present, text columns
        as text, numbers as Python numbers, missing values None."""
        full = {c: None for c in self.fixed} | dict(row)
        return {k: _parse(k, _cell(v)) for k, v in full.items() if v is not None or k in self.fixed}

    def compact(self) -> None:
        """Rewrite the table (and its JSON) atomically with one row per slide; load every row."""
        with file_lock(self.path):
            remove_temporaries_of(self.path)
            if self.json_path is not None:
                remove_temporaries_of(self.json_path)
            self._rewrite(self._read_rows())

    close = compact

    def __enter__(self: TableT) -> TableT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.compact()

    # -- file I/O (callers hold the lock) ---------------------------------------------------------
    def _read_header(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        with open(self.path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None)

    def _read_rows(self) -> dict[str, Row]:
        """Rows on disk, last row of a slide winning, in first-seen order."""
        rows: dict[str, Row] = {}
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                for raw in csv.DictReader(f):
                    if raw.get("slide_id") is None or None in raw:  # a torn last line: skip it
                        continue
                    cells = {k: _parse(k, v) for k, v in raw.items() if v is not None}
                    rows[cells["slide_id"]] = {k: v for k, v in cells.items() if v is not None or k in self.fixed}
        return rows

    def _rewrite(self, on_disk: dict[str, Row], extra: Row | None = None) -> None:
        rows = dict(on_disk)  # every row recorded by this process or another shard is on disk
        if extra is not None:
            rows[str(extra["slide_id"])] = extra
        self.rows = rows
        keys = {k for r in rows.values() for k in r}
        self.header = self.fixed + sorted(keys - set(self.fixed))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self.header)
        text = buf.getvalue() + "".join(self._line(self.header, r) for r in rows.values())
        with atomic_path(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        if self.json_path is not None:
            data = {**self.json_extra, "columns": self.header,
                    "rows": [{c: _json_cell(c, r.get(c)) for c in self.header} for r in rows.values()]}
            with atomic_path(self.json_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, allow_nan=False)

    @staticmethod
    def _line(header: Sequence[str], row: Row) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in header])
        return buf.getvalue()


def _json_cell(column: str, value: Any) -> Any:
    text = _cell(value)
    return text if column in TEXT_COLUMNS else _parse(column, text)


# -- the job -----------------------------------------------------------------------------------------
def pending(entries: Iterable[SlideEntry], table: ResultsTable, complete: Callable[[SlideEntry], bool],
            outputs: Callable[[SlideEntry], Iterable[Path]] = lambda e: ()) -> list[SlideEntry]:
    """The slides left to do: those without an ``ok`` row or whose outputs are not complete. The
    temporaries a killed run left of their outputs are removed."""
    todo = [e for e in entries if not (table.is_ok(e.slide_id) and complete(e))]
    for entry in todo:
        for path in outputs(entry):
            remove_temporaries_of(path)
    return todo


def run_batch(entries: Iterable[SlideEntry], work: Callable[[SlideEntry], Row], is_done: Callable[[SlideEntry], bool],
              log_path: str | Path, columns: list[str], desc: str = "slides", workers: int = 1,
              outputs: Callable[[SlideEntry], Iterable[Path]] = lambda e: ()) -> ResultsTable:
    """Run ``work`` on each slide not yet done and record its guarded row.

    With ``workers > 1`` slides run in that many processes (``work`` must be picklable).
    """
    with ResultsTable(log_path, columns) as table:
        todo = pending(entries, table, is_done, outputs)
        bar = tqdm(total=len(todo), desc=desc, unit="slide", disable=None)
        if workers <= 1:
            for entry in todo:
                bar.set_postfix_str(entry.slide_id)
                table.record(guarded(work, entry))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=worker_context()) as pool:
                futures = [pool.submit(guarded, work, e) for e in todo]
                for future in as_completed(futures):
                    table.record(future.result())
                    bar.update()
        bar.close()
    return table
