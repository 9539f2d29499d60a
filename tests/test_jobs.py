"""The per-slide job: results tables that append a line per slide, shared by shards, compacted per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidemil.errors import SlideOpenError
from slidemil.jobs import ResultsTable, error_text, guarded, pending
from slidemil.processes import worker_context
from slidemil.slide.table import SlideEntry

COLUMNS = ["slide_id", "status", "error", "n_tiles", "seconds"]


def _row(sid: str, status: str = "ok", **extra: object) -> dict:
    return {"slide_id": sid, "status": status, "error": "" if status == "ok" else "boom", "n_tiles": 3,
            "seconds": 0.5, **extra}


def test_each_slide_appends_one_line_and_earlier_bytes_stay(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    table = ResultsTable(path, COLUMNS)
    table.record(_row("a"))
    before = path.read_bytes()
    table.record(_row("b", n_tiles=np.int64(7), seconds=np.float32(0.25)))
    after = path.read_bytes()
    assert after.startswith(before) and after[len(before):] == b"b,ok,,7,0.25\n"
    assert pd.read_csv(path, dtype={"slide_id": str}).slide_id.tolist() == ["a", "b"]
    assert table.get("b") == {"slide_id": "b", "status": "ok", "error": "", "n_tiles": 7, "seconds": 0.25}


def test_the_last_row_wins_and_compaction_keeps_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    with ResultsTable(path, COLUMNS) as table:
        for sid in ("a", "b", "c"):
            table.record(_row(sid, "error" if sid == "b" else "ok"))
        table.record(_row("b"))  # a re-run of the failed slide
        assert path.read_text().count("\nb,") == 2  # appended, not rewritten
    assert pd.read_csv(path).slide_id.tolist() == ["a", "b", "c"] and (pd.read_csv(path).status == "ok").all()
    again = ResultsTable(path, COLUMNS)
    assert again.rows == table.rows and again.is_ok("b")


def test_a_new_column_rewrites_the_header_and_the_json_copy_follows(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "t.csv", COLUMNS, json_path=tmp_path / "t.json", json_extra={"what": "test"})
    table.record(_row("a"))
    table.record(_row("b", member_prob=0.75))
    table.close()
    assert pd.read_csv(tmp_path / "t.csv").columns.tolist() == [*COLUMNS, "member_prob"]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["what"] == "test" and data["columns"][-1] == "member_prob"
    assert [r["member_prob"] for r in data["rows"]] == [None, 0.75]


def test_a_line_cut_short_by_a_killed_writer_is_ended_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    ResultsTable(path, COLUMNS).record(_row("a"))
    with open(path, "a") as f:
        f.write("b,o")  # killed mid-line
    table = ResultsTable(path, COLUMNS)  # the torn row is read as what it is: not ok, so b is redone
    assert not table.is_ok("b")
    table.record(_row("c"))
    table.close()
    assert pd.read_csv(path).set_index("slide_id").status.to_dict() == {"a": "ok", "b": "o", "c": "ok"}


def _append_many(args: tuple[str, str, int]) -> None:
    path, prefix, n = args
    table = ResultsTable(path, COLUMNS)
    for i in range(n):
        table.record(_row(f"{prefix}{i:03d}"))


def test_shards_append_to_one_table_and_every_row_is_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "t.csv")
    with worker_context().Pool(3) as pool:
        pool.map(_append_many, [(path, p, 40) for p in "xyz"])
    table = ResultsTable(path, COLUMNS)
    assert len(table) == 120 and sorted(table.rows) == sorted(f"{p}{i:03d}" for p in "xyz" for i in range(40))
    assert len(pd.read_csv(path)) == 120


def test_pending_and_guarded_rows(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "t.csv", COLUMNS)
    entries = [SlideEntry(s, tmp_path / f"{s}.svs") for s in ("a", "b", "c")]
    table.record(_row("a"))
    table.record(_row("b", "error"))
    (tmp_path / ".tmp-c-abcd1234.h5").write_text("half")  # left by a killed run
    todo = pending(entries, table, complete=lambda e: e.slide_id != "c", outputs=lambda e: [tmp_path / f"{e.slide_id}.h5"])
    assert [e.slide_id for e in todo] == ["b", "c"] and not (tmp_path / ".tmp-c-abcd1234.h5").exists()

    def work(entry: SlideEntry) -> dict:
        if entry.slide_id == "b":
            raise SlideOpenError("b.svs: OpenSlide cannot open it: give another file")
        raise ValueError("bad tile")
    rows = [guarded(work, e) for e in todo]
    assert rows[0]["error"] == "b.svs: OpenSlide cannot open it: give another file"
    assert rows[1]["status"] == "error" and rows[1]["error"] == "ValueError: bad tile" and rows[1]["seconds"] >= 0
    assert error_text(KeyError("x")) == "KeyError: 'x'"


@pytest.mark.parametrize("value, text", [(1.0, "1.0"), (1 / 3, "0.3333333333333333"), (np.float32(0.5), "0.5"),
                                         (float("nan"), ""), (None, ""), (np.int64(406), "406"), ("a,b", '"a,b"')])
def test_cells_are_written_as_pandas_writes_them(tmp_path: Path, value: object, text: str) -> None:
    table = ResultsTable(tmp_path / "t.csv", ["slide_id", "v"])
    table.record({"slide_id": "s", "v": value})
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == f"s,{text}"
    frame = pd.DataFrame([{"slide_id": "s", "v": value}])
    if text and text != "406":
        assert frame.to_csv(index=False).splitlines()[1] == f"s,{text}"
