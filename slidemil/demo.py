"""`slidemil demo`: the whole pipeline on a built-in synthetic cohort, with a summary table.

synthetic cohort -> tile -> extract (small backbone) -> train a gated attention-MIL head on a
patient-grouped split -> export the model package (ONNX) -> score the held-out slides with the
engine. Each step is the library function its own command calls; the demo adds no logic of its own
beyond choosing settings that fit a laptop. Re-running resumes every step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from slidemil.atomic import atomic_path

log = logging.getLogger(__name__)


CLASS_NAMES = ("normal", "tumour")  # labels 0 and 1 of the synthetic cohort


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo; ``quick`` is the CI-sized one (about 2 minutes on 2 cores)."""

    n_slides: int = 24
    size: int = 8192
    lesion_fraction: float = 0.03
    backbone: str = "resnet18"
    epochs: int = 40
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(n_slides=16, size=4096, lesion_fraction=0.08, backbone="test_resnet", epochs=30)


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run every step into ``out``; returns the figures of the final table."""
    from slidemil.engine.score import ScoreConfig, score_slides
    from slidemil.exporter.export import ExportConfig, export_checkpoint
    from slidemil.features.extract import ExtractConfig, extract_features
    from slidemil.slide.synth import SynthConfig, make_cohort
    from slidemil.tile import tile_slides
    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()
    table = make_cohort(out / "cohort", SynthConfig(n_slides=cfg.n_slides, n_classes=2, size=cfg.size,
                                                    lesion_fraction=cfg.lesion_fraction, seed=cfg.seed))
    times["synth"] = _lap(start)
    tile_slides(out / "cohort" / "metadata.csv", out / "tiles")
    times["tile"] = _lap(start, times)
    extract_features(out / "cohort" / "metadata.csv", out / "features", ExtractConfig(backbone=cfg.backbone, backend="auto",
                                                                                       seed=cfg.seed),
                     coords_dir=out / "tiles")
    times["extract"] = _lap(start, times)
    run = _train(out, cfg)
    times["train"] = _lap(start, times)
    package = export_checkpoint(run.out / "checkpoint_best.json", out / "model", ExportConfig(overwrite=True))
    times["export"] = _lap(start, times)
    _quantize(out, table, package.root)
    times["quantize"] = _lap(start, times)
    held_out = _held_out_slides(out, table)
    summary = score_slides([package.root], held_out, out / "scores", ScoreConfig(top_k=4))
    times["score"] = _lap(start, times)
    from slidemil.report.report import build_report
    build_report(out / "scores", out / "report", labels_csv=held_out)
    times["report"] = _lap(start, times)
    return _figures(out, run, summary, times)


def _lap(start: float, times: dict[str, float] | None = None) -> float:
    return round(time.perf_counter() - start - sum((times or {}).values()), 1)


def _train(out: Path, cfg: DemoConfig) -> Any:
    from slidemil.config import load_config
    from slidemil.trainer.config import TrainConfig
    from slidemil.trainer.run import run_training
    train_cfg = load_config(TrainConfig, None, {"data.metadata": str(out / "cohort" / "metadata.csv"),
                                                "data.features": str(out / "features"),
                                                "data.class_names": list(CLASS_NAMES),
                                                "optim.epochs": cfg.epochs, "seed": cfg.seed})
    resume = (out / "train" / "train_config.json").is_file()
    return run_training(train_cfg, out / "train", resume=resume)[0]


def _quantize(out: Path, table: pd.DataFrame, package: Path) -> None:
    """An int8 backbone calibrated on the training slides, so that the engine runs int8 on a CPU."""
    from slidemil.errors import BackendUnavailableError, ConfigError, ExportError
    from slidemil.exporter.quantize import quantize_package
    if (package / "backbone_int8.xml").is_file():
        return
    try:
        quantize_package(package, _split_slides(out, table, "train"))
    except (BackendUnavailableError, ConfigError, ExportError) as exc:  # the demo goes on in floating point
        log.warning("int8 backbone skipped: %s", exc)


def _held_out_slides(out: Path, table: pd.DataFrame) -> Path:
    """A slide table of the test split (slides the head never saw), for the engine and the report."""
    return _split_slides(out, table, "test")


def _split_slides(out: Path, table: pd.DataFrame, split: str) -> Path:
    """A slide table of one split of the training run (slide_id, absolute path, label, patient_id)."""
    splits = pd.read_csv(out / "train" / "splits.csv", dtype={"slide_id": str})
    ids = set(splits.loc[splits.split == split, "slide_id"])
    rows = table[table.slide_id.astype(str).isin(ids)][["slide_id", "path", "label", "patient_id"]].copy()
    rows["path"] = [str((out / "cohort" / p).resolve()) for p in rows.path]
    path = out / ("held_out_slides.csv" if split == "test" else f"{split}_slides.csv")
    with atomic_path(path) as tmp:
        rows.to_csv(tmp, index=False)
    return path


def _figures(out: Path, run: Any, summary: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
    test = json.loads((run.out / "test_metrics.json").read_text())
    val = run.val_metrics
    return {"val_auc": val.get("auc"), "val_balanced_accuracy": val.get("balanced_accuracy"),
            "test_auc": test.get("auc"), "test_balanced_accuracy": test.get("balanced_accuracy"),
            "engine_slides_per_hour": summary["slides_per_hour"], "engine_tiles_per_s": summary["tiles_per_s"],
            "engine_backend": summary["backend"], "seconds": times, "total_seconds": round(sum(times.values()), 1),
            "predictions": str(out / "scores" / "predictions.csv"), "heatmaps": str(out / "scores" / "heatmaps"),
            "model_package": str(out / "model"), "report": str(out / "report" / "index.html")}


def format_table(fig: dict[str, Any]) -> str:
    """The demo's closing table as text."""
    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["", "slidemil demo", "-------------",
             f"validation AUC / balanced accuracy : {num(fig['val_auc'])} / {num(fig['val_balanced_accuracy'])}",
             f"test AUC / balanced accuracy       : {num(fig['test_auc'])} / {num(fig['test_balanced_accuracy'])}",
             f"engine ({', '.join(fig['engine_backend'])}) : {fig['engine_slides_per_hour']} slides/h, "
             f"{fig['engine_tiles_per_s']} tiles/s",
             "step seconds                       : " + ", ".join(f"{k} {v}" for k, v in fig["seconds"].items())
             + f" (total {fig['total_seconds']})",
             f"predictions                        : {fig['predictions']}",
             f"heatmaps                           : {fig['heatmaps']}",
             f"model package                      : {fig['model_package']}",
             f"report (open in a browser)         : {fig['report']}", ""]
    return "\n".join(lines)
