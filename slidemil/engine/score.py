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
from collections.abc import Iterable, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slidemil.choices import AttentionNorm, Backend, CompileMode, Precision
from slidemil.config import save_config
from slidemil.engine.heatmap import normalize_attention, prime_renderer
from slidemil.engine.models import LoadedModel, open_models, operating_point, warm_up
from slidemil.engine.outputs import PredictionsTable, outputs_complete, slide_paths, write_run_summary
from slidemil.engine.slide_outputs import SlideResult, write_slide_outputs
from slidemil.engine.viewer_files import viewer_paths
from slidemil.errors import NoTissueError
from slidemil.evaluation.operating_point import predict_index
from slidemil.jobs import FAILURES, error_text, pending
from slidemil.models.mil import PER_CLASS_OUTPUT
from slidemil.runtime.device_pipeline import prepare_device_decode
from slidemil.runtime.devices import SlideClaims, peak_gpu_mb
from slidemil.runtime.pipeline import PipelineConfig, SlideStream, TilePipeline, backbone_features
from slidemil.runtime.plan import pipeline_settings
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
                 slide_mpp: float | None = None, shard: str | None = None,
                 claims: SlideClaims | None = None) -> dict[str, Any]:
    """Score every slide of a folder, glob or CSV with one package or an ensemble; returns the run summary.

    ``claims``: score the slides claimed from a queue shared by worker processes instead (``--devices``,
    :mod:`slidemil.engine.multi_device`); the caller has already left out the complete ones.
    """
    out = Path(out_dir)
    entries = select_shard(load_slides(slides, slide_mpp), shard) if claims is None else []
    start = time.perf_counter()
    with open_models(model_dirs, cfg.backend, cfg.device, cfg.precision, cfg.threads,
                     cfg.torch_compile, cfg.reading.batch_size, cfg.reading.decode) as models:
        batch, decode_device = pipeline_settings([m.plan for m in models])
        warm_up(models, batch)  # start-up work, once per run: not on the first slide's clock
        prepare_tile_sources(cfg.reading.tile_source)
        if decode_device is not None:
            prepare_device_decode(decode_device)
        prime_renderer()
        load_seconds = time.perf_counter() - start
        class_names = list(models[0].package.class_names)
        tiling = scoring_tiling(models, cfg)
        save_config(cfg, out / "score_config.json", models=[str(m) for m in model_dirs], tiling=tiling,
                    slides=str(slides), shard=shard, operating_point=operating_point(models))
        with PredictionsTable(out, class_names) as table:
            todo: Iterable[Any] = claims if claims is not None else pending(
                entries, table, lambda e: _complete(out, e.slide_id, cfg),
                lambda e: [*slide_paths(out, e.slide_id).values(), *viewer_paths(out, e.slide_id).values()])
            if isinstance(todo, list):
                log.info("%d slides to score (%d already done)", len(todo), len(entries) - len(todo))
            n_tiles, n_scored = _run(models, todo, out, cfg, tiling, table, class_names)
        summary = _summary(table, models, cfg, n_tiles, time.perf_counter() - start, load_seconds, n_scored)
    name = f"run_summary.shard-{shard.replace('/', '-of-')}.json" if shard else "run_summary.json"
    name = f"run_summary.{claims.name}.json" if claims is not None else name
    write_run_summary(out / name, **summary)
    return summary


def _complete(out: Path, slide_id: str, cfg: ScoreConfig) -> bool:
    return outputs_complete(out, slide_id, want_geojson=cfg.geojson, want_topk=cfg.top_k,
                            want_overlap=cfg.heatmap_overlap > 0) and (
        not cfg.viewer_files or all(p.is_file() for p in viewer_paths(out, slide_id).values()))


def _reading(models: list[LoadedModel], cfg: ScoreConfig) -> tuple[PipelineConfig, str | None]:
    """The reading settings with the planner's batch size, and its decode device (None: on the CPU)."""
    batch, decode_device = pipeline_settings([m.plan for m in models])
    return replace(cfg.reading, batch_size=batch), decode_device


def _run(models: list[LoadedModel], todo: Iterable[Any], out: Path, cfg: ScoreConfig, tiling: TilingConfig,
         table: PredictionsTable, class_names: list[str]) -> tuple[int, int]:
    """Score ``todo``; returns (tiles, slides). The main thread runs the backbones, one thread the heads
    (the backbone moves on to the next slide's tiles meanwhile), one thread writes the outputs."""
    total = scored = 0
    bar = tqdm(total=len(todo) if isinstance(todo, Sized) else None, desc="score", unit="slide", disable=None)
    reading, decode_device = _reading(models, cfg)
    with TilePipeline(reading, tiling, decode_device=decode_device) as pipeline, \
            ThreadPoolExecutor(1, thread_name_prefix="writer") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="head") as heads:
        pending: list[Future[Any]] = []

        def finish(stream: SlideStream, features: list[np.ndarray] | None, row: dict[str, Any],
                   start: float) -> Future[None]:
            result = _head_stage(stream, features, row, start, models, cfg, class_names)
            return writer.submit(write_slide_outputs, result, out, cfg, table, class_names, tiling)

        for stream in pipeline.run(todo):
            features, row, start = _backbone_stage(stream, models)
            total, scored = total + stream.n_tiles, scored + 1
            if cfg.heatmap_overlap > 0:  # the overlapping grid runs the backbone again: all on this thread
                result = _head_stage(stream, features, row, start, models, cfg, class_names)
                if result.row["status"] == "ok":
                    _add_overlap_attention(result, models, cfg, tiling)
                pending.append(writer.submit(write_slide_outputs, result, out, cfg, table, class_names, tiling))
            else:
                pending.append(heads.submit(finish, stream, features, row, start))
            bar.update()
            bar.set_postfix(tiles_per_s=round(stream.n_tiles / max(time.perf_counter() - start, 1e-9), 1))
        for f in pending:
            written = f.result()
            if isinstance(written, Future):
                written.result()
    bar.close()
    return total, scored


def _score_stream(stream: SlideStream, models: list[LoadedModel], cfg: ScoreConfig,
                  class_names: list[str]) -> SlideResult:
    """Backbone over every batch, then the head: one slide's probabilities and attention."""
    features, row, start = _backbone_stage(stream, models)
    return _head_stage(stream, features, row, start, models, cfg, class_names)


def _backbone_stage(stream: SlideStream, models: list[LoadedModel]) -> tuple[list[np.ndarray] | None, dict[str, Any], float]:
    """Every member's features of the slide's tiles, its row so far and its start time (features None: failed)."""
    start = time.perf_counter()
    row: dict[str, Any] = {"slide_id": stream.entry.slide_id, "status": "ok", "error": ""}
    try:
        if stream.error is not None:
            raise stream.error
        if stream.n_tiles == 0:
            raise NoTissueError(f"{stream.entry.slide_id}: no tissue tiles to score")
        features = backbone_features(stream, [m.backbone for m in models], [m.package.card.feature_dim for m in models])
    except FAILURES as exc:
        stream.drain()
        _failed(row, stream, exc, start)
        return None, row, start
    return features, row, start


def _head_stage(stream: SlideStream, features: list[np.ndarray] | None, row: dict[str, Any], start: float,
                models: list[LoadedModel], cfg: ScoreConfig, class_names: list[str]) -> SlideResult:
    """The heads on the slide's features: its probabilities and attention (or its error row)."""
    if features is None:
        return SlideResult(stream=stream, row=row)
    try:
        heads = [m.head.infer({"features": f}) for m, f in zip(models, features)]
    except FAILURES as exc:
        _failed(row, stream, exc, start)
        return SlideResult(stream=stream, row=row)
    return _combine(stream, models, heads, cfg, class_names, row, time.perf_counter() - start)


def _failed(row: dict[str, Any], stream: SlideStream, exc: BaseException, start: float) -> None:
    log.warning("%s: %s", stream.entry.slide_id, exc)
    row.update(status="error", error=error_text(exc), n_tiles=stream.n_tiles, seconds=round(time.perf_counter() - start, 3))


def _combine(stream: SlideStream, models: list[LoadedModel], heads: list[dict[str, np.ndarray]], cfg: ScoreConfig,
             class_names: list[str], row: dict[str, Any], seconds: float) -> SlideResult:
    """Average the members' probabilities and normalised attention (and per-class maps, where every member
    has them); fill the predictions row, its class at the packages' operating point."""
    probs = np.mean([h["probabilities"] for h in heads], axis=0)
    attention = np.mean([normalize_attention(h["attention_raw"], cfg.attention_norm) for h in heads], axis=0)
    raw = np.mean([h["attention_raw"] for h in heads], axis=0)
    per_class = (np.mean([[normalize_attention(a, cfg.attention_norm) for a in h[PER_CLASS_OUTPUT]] for h in heads],
                         axis=0) if all(PER_CLASS_OUTPUT in h for h in heads) else None)
    index = int(predict_index(probs, operating_point(models)))
    row.update(pred_class=class_names[index], pred_index=index, n_tiles=stream.n_tiles,
               seconds=round(seconds, 3), tiles_per_s=round(stream.n_tiles / seconds, 2),
               attention_norm=cfg.attention_norm, **{f"prob_{c}": float(p) for c, p in zip(class_names, probs)})
    if len(models) > 1:
        for m, h in zip(models, heads):
            row.update({f"{m.name}:prob_{c}": float(p) for c, p in zip(class_names, h["probabilities"])})
    return SlideResult(stream=stream, row=row, probabilities=probs, attention=attention, attention_raw=raw,
                       attention_per_class=per_class)


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
    reading, decode_device = _reading(models, cfg)
    with TilePipeline(reading, TilingConfig(tile=spec, tissue=tiling.tissue), lambda e: dense,
                      decode_device=decode_device) as pipeline:
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
            "plan": [m.plan.describe() for m in models],
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "attention_norm": cfg.attention_norm}
