"""Deep-zoom viewer benchmark: build time and size of the viewers of a scored cohort.

Run by hand from the repository root on the output of ``slidemil score``::

    slidemil synth COHORT --n-slides 100 --size 4096 --seed 0
    slidemil score MODEL COHORT/slides --out SCORED
    python bench/viewer.py SCORED --out REPORT [--max-mpp 1.0] [--workers 2] [--quality 80]

Builds ``slidemil report SCORED`` with viewers for every slide (``--viewer all``) into ``--out``,
then builds the viewers again (every pyramid reused), and prints: slides, tiles written, report
size by part (tiles, overlays, pages, shared assets, the rest of the report), build times, and the
share of the full-resolution tile grid that was written (blank glass is not).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from slidemil.report.deepzoom import DziGeometry
from slidemil.report.report import build_report
from slidemil.report.viewer import ViewerConfig, build_viewers


def _size(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scored", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-mpp", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--quality", type=int, default=80)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    build_report(args.scored, args.out, n_boot=0,
                 viewer=ViewerConfig(which="all", max_mpp=args.max_mpp, workers=args.workers, quality=args.quality))
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = build_viewers(args.scored, args.out, which="all", max_mpp=args.max_mpp, workers=args.workers,
                          quality=args.quality)
    second = time.perf_counter() - start
    viewer = args.out / "viewer"
    records = [json.loads(p.read_text()) for p in sorted((viewer / "tiles").glob("*.json"))]
    full = written = 0
    for r in records:
        image = r["dzi"]["Image"]
        g = DziGeometry(int(image["Size"]["Width"]), int(image["Size"]["Height"]), int(image["TileSize"]))
        cols, rows = g.n_tiles(r["levels"]["cap"])
        full += cols * rows
        written += r["per_level"][str(r["levels"]["cap"])]
    parts = {"tiles": _size(viewer / "tiles"), "overlays": _size(viewer / "overlay"),
             "pages": _size(viewer, "*.html"), "assets": _size(viewer / "assets")}
    parts["rest of the report"] = _size(args.out) - sum(parts.values())
    n_files = sum(1 for p in (viewer / "tiles").glob("**/*") if p.is_file())
    print(f"slides with a viewer: {len(again.pages)}; tiles: {again.tiles} ({n_files} files under tiles/)")
    print(f"deepest level: {written} of {full} tiles written ({100 * written / max(full, 1):.1f}%)")
    for name, b in parts.items():
        print(f"  {name:20s} {b / 1e6:9.1f} MB")
    print(f"  {'total':20s} {_size(args.out) / 1e6:9.1f} MB")
    print(f"report with viewers: {first:.1f} s; viewers again (all reused: {again.reused}): {second:.1f} s")


if __name__ == "__main__":
    main()
