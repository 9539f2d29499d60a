"""Compare two output folders of the same command file by file (e.g. `slidemil demo --quick` run before and
after a refactor, into the same path): sha256 first; for files whose bytes differ, whether they differ in
content or only in what varies from run to run: timings, the order of safetensors metadata, the node
metadata of dynamo-exported ONNX graphs (stack traces with source paths), random ids in matplotlib SVGs,
and the checksums other files record of those.

usage: python bench/compare_outputs.py BEFORE_DIR AFTER_DIR      (exit 1 when a file differs in content)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

TIMING = {"seconds", "tiles_per_s", "created", "wall_seconds", "model_load_seconds", "slides_per_hour",
          "tiles_per_s_after_load", "peak_rss_mb", "bags_per_s", "build_seconds", "seconds_per_slide",
          "step_seconds", "total_seconds", "engine_tiles_per_s", "engine_slides_per_hour"}
CHECKSUM_KEYS = ("sha256", "bytes", "weights_sha256", "tensors_sha256", ".safetensors")
SVG_NOISE = re.compile(rb'(id="|url\(#|xlink:href="#)[A-Za-z0-9_]+|<dc:date>[^<]*</dc:date>')


def strip(obj: Any) -> Any:
    """``obj`` without its timing fields."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def json_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths of the leaves where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in json_differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def why_json(a: Path, b: Path) -> str:
    paths = json_differences(strip(json.loads(a.read_text())), strip(json.loads(b.read_text())))
    if not paths:
        return "same apart from timings"
    if all(p.endswith(CHECKSUM_KEYS) or ".safetensors" in p for p in paths):
        return "same apart from timings and the checksums of files listed here"
    return "CONTENT: " + ", ".join(paths[:6])


def why_csv(a: Path, b: Path) -> str:
    rows = [[strip(r) for r in csv.DictReader(io.StringIO(p.read_text()))] for p in (a, b)]
    return "same apart from timings" if rows[0] == rows[1] else "CONTENT"


def why_safetensors(a: Path, b: Path) -> str:
    from safetensors.numpy import load_file
    ta, tb = load_file(str(a)), load_file(str(b))
    same = ta.keys() == tb.keys() and all((ta[n] == tb[n]).all() for n in ta)
    return "same tensors (metadata order differs)" if same else "CONTENT: tensors differ"


def why_onnx(a: Path, b: Path) -> str:
    import onnx
    models = [onnx.load(str(p)) for p in (a, b)]
    for m in models:
        m.ClearField("producer_version")
        m.ClearField("metadata_props")
        m.graph.ClearField("doc_string")
        for node in m.graph.node:  # the dynamo exporter records stack traces (source paths) per node
            node.ClearField("metadata_props")
            node.ClearField("doc_string")
    same = models[0].graph.SerializeToString() == models[1].graph.SerializeToString()
    return "same graph (node metadata differs)" if same else "CONTENT: graph differs"


def why_svg(a: Path, b: Path) -> str:
    same = SVG_NOISE.sub(b"", a.read_bytes()) == SVG_NOISE.sub(b"", b.read_bytes())
    return "same drawing (random ids, date)" if same else "CONTENT"


def why_html(a: Path, b: Path) -> str:
    digits = re.compile(rb"[0-9][0-9.]*")
    same = digits.sub(b"", a.read_bytes()) == digits.sub(b"", b.read_bytes())
    return "same apart from numbers (the timings shown on the page)" if same else "CONTENT"


WHY = {".html": why_html, ".json": why_json, ".csv": why_csv, ".safetensors": why_safetensors, ".onnx": why_onnx, ".svg": why_svg}


def main() -> int:
    before, after = Path(sys.argv[1]), Path(sys.argv[2])
    files = [{str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()} for root in (before, after)]
    print("only before:", sorted(set(files[0]) - set(files[1])))
    print("only after:", sorted(set(files[1]) - set(files[0])))
    common = sorted(set(files[0]) & set(files[1]))
    differ = [k for k in common if hashlib.sha256(files[0][k].read_bytes()).hexdigest()
              != hashlib.sha256(files[1][k].read_bytes()).hexdigest()]
    print(f"{len(common) - len(differ)} of {len(common)} files byte-identical; {len(differ)} differ:")
    content = 0
    for k in differ:
        why = WHY.get(files[0][k].suffix, lambda a, b: "CONTENT (not compared further)")(files[0][k], files[1][k])
        content += why.startswith("CONTENT")
        print(f"  {k}: {why}")
    return 1 if content else 0


if __name__ == "__main__":
    sys.exit(main())
