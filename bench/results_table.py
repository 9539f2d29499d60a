"""Cost of recording one slide's row in a job's results table, over a cohort of N slides.

Times ``record`` of every slide into a fresh table, per slide, and prints the median time per slide
over the first and the last 10% of the cohort (flat when a slide costs the same at the end as at the
start) and the total. Runs against whichever slidemil is importable, so that two versions can be
compared side by side: ``PYTHONPATH=OLD_CHECKOUT python bench/results_table.py`` then the same with
the new one.

usage: python bench/results_table.py [--slides 2000] [--table predictions|batch]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def make_table(kind: str, folder: Path) -> Any:
    if kind == "predictions":
        from slidemil.engine.outputs import PredictionsTable
        return PredictionsTable(folder, ["normal", "tumour"])
    import slidemil
    columns = ["slide_id", "status", "error", "n_tiles", "seconds"]
    if (Path(slidemil.__file__).parent / "jobs.py").is_file():
        from slidemil.jobs import ResultsTable
        return ResultsTable(folder / "extraction.csv", columns)
    from slidemil.batch import BatchLog  # type: ignore[import-not-found]  # before the per-slide job was shared
    return BatchLog(folder / "extraction.csv", columns)


def row(i: int) -> dict[str, Any]:
    return {"slide_id": f"slide_{i:05d}", "status": "ok", "error": "", "pred_class": "tumour", "pred_index": 1,
            "prob_normal": 0.25 + i * 1e-6, "prob_tumour": 0.75 - i * 1e-6, "n_tiles": 1000 + i, "seconds": 1.5,
            "tiles_per_s": 80.0, "attention_norm": "percentile"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--table", choices=["predictions", "batch"], default="predictions")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = make_table(args.table, Path(tmp))
        times = []
        for i in range(args.slides):
            start = time.perf_counter()
            table.record(row(i))
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        getattr(table, "close", lambda: None)()
        close = time.perf_counter() - start
    tenth = max(1, args.slides // 10)
    first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
    import slidemil
    print(f"{type(table).__name__} ({Path(slidemil.__file__).parent}), {args.slides} slides: per slide "
          f"{1e3 * first:.3f} ms (first 10%), {1e3 * last:.3f} ms (last 10%), ratio {last / first:.1f}x; "
          f"total {sum(times):.2f} s, closing {1e3 * close:.1f} ms")


if __name__ == "__main__":
    main()
