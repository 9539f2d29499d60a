"""`slidemil score`: slides in, predictions and attention heatmaps out, in one pass per slide.

Tiles flow through the shared ``TilePipeline`` (reading runs ahead, also into the next slide) into
each package's backbone runner; features stay in memory; the head runner gives probabilities and
attention. Outputs of a slide (heatmap, overlay, GeoJSON, top-k tiles, its predictions row) are
written by a background writer thread so the model never waits for them. Every file is atomic, a
slide whose outputs are complete is skipped on a re-run, and a failing slide becomes a row with
status ``error`` while the batch goes on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slidemil.choices import AttentionNorm, Backend, CompileMode, Precision
from slidemil.config import save_config
from slidemil.engine.heatmap import normalize_attention, prime_renderer
from slidemil.engine.models import LoadedModel, open_models, warm_up
from slidemil.engine.outputs import PredictionsTable, outputs_complete, slide_paths, write_run_summary
from slidemil.engine.slide_outputs import SlideResult, write_slide_outputs
from slidemil.engine.viewer_files import viewer_paths
from slidemil.errors import NoTissueError
from slidemil.jobs import FAILURES, error_text, pending
from slidemil.runtime.pipeline import PipelineConfig, SlideStream, TilePipeline, backbone_features
from slidemil.slide.sources import prepare_tile_sources
from slidemil.slide.table import load_slides, select_shard
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of ``slidemil score`` (tiling comes from the package; these override parts of it)."""

    backend: Backend = "auto"
    device: str = "auto"
    precision: Precision = "auto"
    threads: int | None = None
    torch_compile: CompileMode = "auto"
    reading: PipelineConfig = PipelineConfig()
    attention_norm: AttentionNorm = "percentile"
    top_k: int = 8
    heatmap_overlap: float = 0.0
    geojson: bool = True
    viewer_files: bool = True  # the OME-TIFF attention overlay and QuPath annotations
    min_tissue: float | None = None
    allow_upsample: bool | None = None
    mask_dir: str | None = None


def scoring_tiling(models: list[LoadedModel], cfg: ScoreConfig) -> TilingConfig:
    """The first package's tiling with the user's overrides."""
    tiling = models[0].package.tiling
    tile = replace(tiling.tile, min_tissue=cfg.min_tissue) if cfg.min_tissue is not None else tiling.tile
    tile = replace(tile, allow_upsample=cfg.allow_upsample) if cfg.allow_upsample is not None else tile
    tissue = replace(tiling.tissue, mask_dir=cfg.mask_dir) if cfg.mask_dir else tiling.tissue
    return TilingConfig(tile=tile, tissue=tissue)


def score_slides(model_dirs: list[str | Path], slides: str | Path, out_dir: str | Path, cfg: ScoreConfig = ScoreConfig(),
                 slide_mpp: float | None = None, shard: str | None = None) -> dict[str, Any]:
    """Score every slide of a folder, glob or CSV with one package or an ensemble; returns the run summary."""
    out = Path(out_dir)
    entries = select_shard(load_slides(slides, slide_mpp), shard)
    start = time.perf_counter()
    with open_models(model_dirs, cfg.backend, cfg.device, cfg.precision, cfg.threads,
                     cfg.torch_compile) as models:
        warm_up(models, cfg.reading.batch_size)  # start-up work, once per run: not on the first slide's clock
        prepare_tile_sources(cfg.reading.tile_source)
        prime_renderer()
        load_seconds = time.perf_counter() - start
        class_names = list(models[0].package.class_names)
        tiling = scoring_tiling(models, cfg)
        save_config(cfg, out / "score_config.json", models=[str(m) for m in model_dirs], tiling=tiling,
                    slides=str(slides), shard=shard)
        with PredictionsTable(out, class_names) as table:
            todo = pending(entries, table, lambda e: _complete(out, e.slide_id, cfg),
                           lambda e: [*slide_paths(out, e.slide_id).values(), *viewer_paths(out, e.slide_id).values()])
            log.info("%d slides to score (%d already done)", len(todo), len(entries) - len(todo))
            n_tiles = _run(models, todo, out, cfg, tiling, table, class_names)
        summary = _summary(table, models, cfg, n_tiles, time.perf_counter() - start, load_seconds, len(todo))
    name = f"run_summary.shard-{shard.replace('/', '-of-')}.json" if shard else "run_summary.json"
    write_run_summary(out / name, **summary)
    return summary


def _complete(out: Path, slide_id: str, cfg: ScoreConfig) -> bool:
    return outputs_complete(out, slide_id, want_geojson=cfg.geojson, want_topk=cfg.top_k,
                            want_overlap=cfg.heatmap_overlap > 0) and (
        not cfg.viewer_files or all(p.is_file() for p in viewer_paths(out, slide_id).values()))


def _run(models: list[LoadedModel], todo: list[Any], out: Path, cfg: ScoreConfig, tiling: TilingConfig,
         table: PredictionsTable, class_names: list[str]) -> int:
    total = 0
    bar = tqdm(total=len(todo), desc="score", unit="slide", disable=None)
    with TilePipeline(cfg.reading, tiling) as pipeline, ThreadPoolExecutor(1, thread_name_prefix="writer") as writer:
        pending: list[Future[None]] = []
        for stream in pipeline.run(todo):
            result = _score_stream(stream, models, cfg, class_names)
            total += result.row.get("n_tiles") or 0
            if result.row["status"] == "ok" and cfg.heatmap_overlap > 0:
                _add_overlap_attention(result, models, cfg, tiling)
            pending.append(writer.submit(write_slide_outputs, result, out, cfg, table, class_names, tiling))
            bar.update()
            bar.set_postfix(tiles_per_s=result.row.get("tiles_per_s"))
        for f in pending:
            f.result()
    bar.close()
    return total


def _score_stream(stream: SlideStream, models: list[LoadedModel], cfg: ScoreConfig,
                  class_names: list[str]) -> SlideResult:
    """Backbone over every batch, then the head: one slide's probabilities and attention."""
    start = time.perf_counter()
    row: dict[str, Any] = {"slide_id": stream.entry.slide_id, "status": "ok", "error": ""}
    try:
        if stream.error is not None:
            raise stream.error
        if stream.n_tiles == 0:
            raise NoTissueError(f"{stream.entry.slide_id}: no tissue tiles to score")
        features = backbone_features(stream, [m.backbone for m in models], [m.package.card.feature_dim for m in models])
        heads = [m.head.infer({"features": f}) for m, f in zip(models, features)]
    except FAILURES as exc:
        stream.drain()
        log.warning("%s: %s", stream.entry.slide_id, exc)
        row.update(status="error", error=error_text(exc), n_tiles=stream.n_tiles,
                   seconds=round(time.perf_counter() - start, 3))
        return SlideResult(stream=stream, row=row)
    return _combine(stream, models, heads, cfg, class_names, row, time.perf_counter() - start)


def _combine(stream: SlideStream, models: list[LoadedModel], heads: list[dict[str, np.ndarray]], cfg: ScoreConfig,
             class_names: list[str], row: dict[str, Any], seconds: float) -> SlideResult:
    """Average the members' probabilities and normalised attention; fill the predictions row."""
    probs = np.mean([h["probabilities"] for h in heads], axis=0)
    attention = np.mean([normalize_attention(h["attention_raw"], cfg.attention_norm) for h in heads], axis=0)
    raw = np.mean([h["attention_raw"] for h in heads], axis=0)
    index = int(np.argmax(probs))
    row.update(pred_class=class_names[index], pred_index=index, n_tiles=stream.n_tiles,
               seconds=round(seconds, 3), tiles_per_s=round(stream.n_tiles / seconds, 2),
               attention_norm=cfg.attention_norm, **{f"prob_{c}": float(p) for c, p in zip(class_names, probs)})
    if len(models) > 1:
        for m, h in zip(models, heads):
            row.update({f"{m.name}:prob_{c}": float(p) for c, p in zip(class_names, h["probabilities"])})
    return SlideResult(stream=stream, row=row, probabilities=probs, attention=attention, attention_raw=raw)


def _add_overlap_attention(result: SlideResult, models: list[LoadedModel], cfg: ScoreConfig,
                           tiling: TilingConfig) -> None:
    """Score the overlapping grid too; a read error there fails the slide, not the batch."""
    try:
        result.overlap_attention = _overlap_attention(result.stream, models, cfg, tiling)
    except FAILURES as exc:
        log.warning("%s: overlapping grid: %s", result.stream.entry.slide_id, exc)
        result.row.update(status="error", error=f"overlapping grid: {error_text(exc)}")


def _overlap_attention(stream: SlideStream, models: list[LoadedModel], cfg: ScoreConfig,
                       tiling: TilingConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw attention of an overlapping grid (each tile's score depends on its own features only)."""
    from slidemil.slide.grid import make_grid
    plan = stream.plan
    assert plan is not None
    spec = replace(tiling.tile, overlap=int(round(tiling.tile.patch_size * cfg.heatmap_overlap)))
    grid = make_grid(plan.grid.level0_size, plan.grid.slide_mpp, spec, plan.tissue)
    dense = replace(plan, grid=grid)
    with TilePipeline(cfg.reading, TilingConfig(tile=spec, tissue=tiling.tissue), lambda e: dense) as pipeline:
        # A loop, never next(iter(run(...))): a dropped generator closes at once and stops its reader.
        for inner in pipeline.run([stream.entry]):
            if inner.error is not None:
                raise inner.error
            raws = backbone_features(inner, [m.backbone for m in models], [m.package.card.feature_dim for m in models])
    scores = np.mean([normalize_attention(m.head.infer({"features": f})["attention_raw"], cfg.attention_norm)
                      for m, f in zip(models, raws)], axis=0)
    return grid.coords[:len(scores)], scores, grid.patch_size_level0


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _summary(table: PredictionsTable, models: list[LoadedModel], cfg: ScoreConfig, n_tiles: int,
             wall: float, load: float, n_scored: int) -> dict[str, Any]:
    rows = list(table.rows.values())
    failed = [r["slide_id"] for r in rows if r.get("status") != "ok"]
    scoring = wall - load
    return {"slides": len(rows), "scored_this_run": n_scored, "failures": len(failed), "failed_slides": failed,
            "total_tiles": n_tiles, "wall_seconds": round(wall, 3), "model_load_seconds": round(load, 3),
            "slides_per_hour": round(3600 * n_scored / wall, 1) if wall > 0 else None,
            "tiles_per_s": round(n_tiles / wall, 2) if wall > 0 else None,
            "tiles_per_s_after_load": round(n_tiles / scoring, 2) if scoring > 0 else None,
            "backend": [m.backbone.describe() for m in models], "device": cfg.device,
            "peak_rss_mb": peak_rss_mb(),
            "attention_norm": cfg.attention_norm}
