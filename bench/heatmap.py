"""Time per slide of `slidemil heatmap` (head only, on stored features) against `slidemil score` on the same slides.

Run by hand from the repository root (package installed): ``python bench/heatmap.py [--backbone resnet50_trunc]
[--size 16384] [--n-slides 2] [--backend auto] [--out DIR]``.

A synthetic cohort is written, a package is exported from a random-weights checkpoint of the backbone with
a gated head (bench/export.py), features of the cohort are extracted with the same backbone on
``--backend``, then both commands run in this process on the same slides with the same package: ``score``
(tissue, tiles, backbone, head, outputs) and ``heatmap`` (features file, head, the same outputs plus the
smooth map and the viewer files). Per slide: seconds after start-up (the model-load time of each run is
left out), and the largest difference of probability and normalised attention between the two.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.engine.heatmap_from_features import HeatmapConfig, heatmaps_from_features
from slidemil.engine.score import ScoreConfig, score_slides
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.features.extract import ExtractConfig, extract_features
from slidemil.slide.synth import SynthConfig, make_cohort


def per_slide(summary: dict) -> float:
    return (summary["wall_seconds"] - summary["model_load_seconds"]) / max(1, summary["scored_this_run"])


def differences(a: Path, b: Path) -> tuple[float, float]:
    """Largest |d probability| and |d attention| (heatmap grids) between two output folders."""
    pa, pb = (pd.read_csv(p / "predictions.csv").set_index("slide_id").sort_index() for p in (a, b))
    cols = [c for c in pa.columns if c.startswith("prob_")]
    dp = float(np.abs(pa[cols].to_numpy() - pb.loc[pa.index, cols].to_numpy()).max())
    da = max(float(np.nanmax(np.abs(np.load(a / "heatmaps" / f"{s}.npy") - np.load(b / "heatmaps" / f"{s}.npy"))))
             for s in pa.index)
    return dp, da


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--backend", default="auto", help="backend of score and extract (auto, onnxruntime, openvino)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export import make_checkpoint  # bench/export.py: a checkpoint in the trainer's format

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-heatmap-"))
    slides = work / "cohort" / "slides"
    make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, seed=0), progress=False)
    ckpt = make_checkpoint(work / "run", args.backbone, "random", 256)
    export_checkpoint(ckpt, work / "model", ExportConfig(overwrite=True))
    start = time.perf_counter()
    extract_features(slides, work / "feat", ExtractConfig(checkpoint=str(ckpt), backend=args.backend, device="cpu"))
    extract_s = time.perf_counter() - start
    score = score_slides([work / "model"], slides, work / "scored", ScoreConfig(backend=args.backend, device="cpu"))
    heat = heatmaps_from_features(work / "feat", work / "model", work / "heatmap", HeatmapConfig(), slides=slides)
    dp, da = differences(work / "scored", work / "heatmap")
    result = {"backbone": args.backbone, "size": args.size, "slides": args.n_slides, "tiles": score["total_tiles"],
              "backend": score["backend"], "extract_seconds": round(extract_s, 2),
              "score_seconds_per_slide": round(per_slide(score), 3),
              "heatmap_seconds_per_slide": round(per_slide(heat), 3),
              "max_abs_d_probability": dp, "max_abs_d_attention": da}
    (work / "bench_heatmap.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
