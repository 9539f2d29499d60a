"""Per-slide batch jobs that resume and never stop on one bad slide.

``run_batch`` calls a function per slide, records one row per slide in a CSV (rewritten atomically
after every slide), skips slides whose outputs are complete, and turns a ``SlidemilError`` (or any
failure of a third-party reader) into a row with status ``error`` and the message, with the slide's
own id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from slidemil.atomic import atomic_path, file_lock, remove_temporaries_of
from slidemil.errors import SlidemilError
from slidemil.processes import worker_context
from slidemil.slide.table import SlideEntry

log = logging.getLogger(__name__)


class BatchLog:
    """The per-slide results table of a batch job, kept on disk after every slide."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.columns = columns
        self.rows: dict[str, dict[str, Any]] = self._read()
        self._mine: set[str] = set()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        old = pd.read_csv(self.path, dtype={"slide_id": str}, keep_default_na=False)
        return {str(row["slide_id"]): row for row in old.to_dict("records")}

    def get(self, slide_id: str) -> dict[str, Any] | None:
        return self.rows.get(slide_id)

    def record(self, row: dict[str, Any]) -> None:
        """Add this slide's row; rows other processes (shards of one job) wrote meanwhile are kept."""
        slide_id = str(row["slide_id"])
        self.rows[slide_id] = row
        self._mine.add(slide_id)
        with file_lock(self.path):
            remove_temporaries_of(self.path)  # left by a killed writer; none is being written now
            self.rows = {**self._read(), **{k: v for k, v in self.rows.items() if k in self._mine}}
            self.flush()

    def flush(self) -> None:
        extra = sorted({k for r in self.rows.values() for k in r} - set(self.columns))
        frame = pd.DataFrame(list(self.rows.values()), columns=self.columns + extra)
        with atomic_path(self.path) as tmp:
            frame.to_csv(tmp, index=False)


def guarded(work: Callable[[SlideEntry], dict[str, Any]], entry: SlideEntry) -> dict[str, Any]:
    """``work(entry)`` as a result row: status ok, or status error with the message; never raises."""
    start = time.perf_counter()
    try:
        row = {"status": "ok", "error": "", **work(entry)}
    except SlidemilError as exc:
        log.warning("%s: %s", entry.slide_id, exc)
        row = {"status": "error", "error": str(exc)}
    except (OSError, ValueError, RuntimeError) as exc:  # third-party readers raise these on bad files
        log.warning("%s: %s: %s", entry.slide_id, type(exc).__name__, exc)
        row = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"slide_id": entry.slide_id, **row, "seconds": round(time.perf_counter() - start, 3)}


def run_batch(entries: Iterable[SlideEntry], work: Callable[[SlideEntry], dict[str, Any]],
              is_done: Callable[[SlideEntry], bool], log_path: str | Path, columns: list[str],
              desc: str = "slides", workers: int = 1) -> BatchLog:
    """Run ``work`` on each slide not yet done; record its row (status, error, seconds, ...).

    With ``workers > 1`` slides run in that many processes (``work`` must be picklable).
    """
    batch = BatchLog(log_path, columns)
    todo = [e for e in entries if not (is_done(e) and (batch.get(e.slide_id) or {}).get("status") == "ok")]
    bar = tqdm(total=len(todo), desc=desc, unit="slide", disable=None)
    if workers <= 1:
        for entry in todo:
            bar.set_postfix_str(entry.slide_id)
            batch.record(guarded(work, entry))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=worker_context()) as pool:
            futures = [pool.submit(guarded, work, e) for e in todo]
            for future in as_completed(futures):
                batch.record(future.result())
                bar.update()
    bar.close()
    return batch
