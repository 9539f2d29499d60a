"""Feature extraction: the engine's tile pipeline + a backbone runner + an h5 features writer.

The features folder records the backbone it used (``backbone/backbone_card.json``, and its weights
``backbone/backbone.safetensors`` when they cannot be fetched again by name), so that a head
trained on these features can only be exported with that same backbone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slidemil.artifacts.features_folder import BACKBONE_DIR, features_path, record_backbone
from slidemil.artifacts.tiling_record import copy_tiling_record, find_coords, load_tiling
from slidemil.choices import CompileMode, ExtractBackend, Precision
from slidemil.config import save_config
from slidemil.jobs import FAILURES, ResultsTable, error_text, pending
from slidemil.models.backbones import BackboneCard, create_backbone
from slidemil.models.preprocess import UInt8Backbone
from slidemil.runtime.device_pipeline import prepare_device_decode
from slidemil.runtime.devices import SlideClaims
from slidemil.runtime.pipeline import PipelineConfig, SlideStream, TilePipeline, backbone_features
from slidemil.runtime.plan import backbone_files, build_backbone_runner, plan_execution
from slidemil.runtime.runners import Runner
from slidemil.slide.grid import grid_from_coords
from slidemil.slide.sources import prepare_tile_sources
from slidemil.slide.store import is_complete, read_h5, write_h5
from slidemil.slide.table import SlideEntry, load_slides, select_shard
from slidemil.slide.tiling import TilePlan, TilingConfig

log = logging.getLogger(__name__)

EXTRACT_COLUMNS = ["slide_id", "status", "error", "n_tiles", "seconds", "tiles_per_s"]


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``slidemil extract``."""

    backbone: str = "resnet50_trunc"
    weights: str | None = None
    checkpoint: str | None = None
    backend: ExtractBackend = "auto"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    torch_compile: CompileMode = "auto"
    reading: PipelineConfig = PipelineConfig()
    tiling: TilingConfig = field(default_factory=TilingConfig)


def prepare_backbone(cfg: ExtractConfig, out_dir: Path) -> tuple[UInt8Backbone, BackboneCard]:
    """Build (or load from a checkpoint) the backbone and record it in ``out_dir/backbone``."""
    if cfg.checkpoint:
        from slidemil.artifacts.checkpoint import load_checkpoint_backbone
        model, card = load_checkpoint_backbone(cfg.checkpoint)
    else:
        torch.manual_seed(cfg.seed)  # random weights are then the same in every shard of an array job
        model, card = create_backbone(cfg.backbone, cfg.weights)
    card = record_backbone(out_dir, model, card)
    return UInt8Backbone(model, card).eval(), card


def plan_from_coords(coords_dir: Path) -> Any:
    """A planner that reads a slide's grid from ``coords_dir/coords/<id>.h5`` (``slidemil tile``'s output)."""
    def plan(entry: SlideEntry) -> TilePlan:
        bag = read_h5(find_coords(coords_dir, entry.slide_id), load_features=False)
        a = bag.attrs
        grid = grid_from_coords(bag.coords, a.patch_size_level0, a.stride_level0, (a.level0_width, a.level0_height),
                                a.slide_mpp)
        return TilePlan(tissue=None, thumbnail=None, grid=grid, attrs=a)  # type: ignore[arg-type]
    return plan


def extract_features(slides: str | Path, out_dir: str | Path, cfg: ExtractConfig,
                     coords_dir: str | Path | None = None, slide_mpp: float | None = None,
                     shard: str | None = None, claims: SlideClaims | None = None) -> ResultsTable:
    """Extract features of every slide (coords from ``coords_dir``, or tiled on the fly).

    ``claims``: the slides claimed from a queue shared by worker processes instead (``--devices``,
    :mod:`slidemil.features.multi_device`); the caller has already left out the complete ones.
    """
    out = Path(out_dir)
    entries = select_slides(slides, slide_mpp, shard, coords_dir) if claims is None else []
    if coords_dir is not None:
        cfg = replace(cfg, tiling=load_tiling(coords_dir))
    module, card = prepare_backbone(cfg, out)
    save_config(cfg, out / "extract_config.json", slides=str(slides), coords=str(coords_dir), backbone_card=card.to_dict())
    copy_tiling_record(coords_dir, out, cfg.tiling)
    with ResultsTable(out / "extraction.csv", EXTRACT_COLUMNS) as table:
        if claims is not None:
            _extract(claims, cfg, module, card, out, coords_dir, table)
            return table
        todo = pending_slides(entries, out, table)
        if not todo:
            log.info("all %d slides already have features in %s", len(entries), out)
        else:
            _extract(todo, cfg, module, card, out, coords_dir, table)
    return table


def select_slides(slides: str | Path, slide_mpp: float | None, shard: str | None,
                  coords_dir: str | Path | None) -> list[SlideEntry]:
    """The slides of this shard (those with coords, where ``coords_dir`` has any)."""
    entries = select_shard(load_slides(slides, slide_mpp), shard)
    if coords_dir is not None:
        entries = [e for e in entries if _has_coords(Path(coords_dir), e.slide_id)] or entries
    return entries


def pending_slides(entries: list[SlideEntry], out: Path, table: ResultsTable) -> list[SlideEntry]:
    """The slides without a complete features file (temporaries of a killed run removed)."""
    return pending(entries, table, lambda e: is_complete(features_path(out, e.slide_id), need_features=True),
                   lambda e: [features_path(out, e.slide_id)])


def _extract(todo: Iterable[SlideEntry], cfg: ExtractConfig, module: nn.Module, card: BackboneCard, out: Path,
             coords_dir: str | Path | None, table: ResultsTable) -> None:
    planner = plan_from_coords(Path(coords_dir)) if coords_dir is not None else None
    files = backbone_files(module, card, out / BACKBONE_DIR, cfg.tiling.tile.patch_size)
    plan = plan_execution(files, cfg.backend, cfg.device, cfg.precision, torch_compile=cfg.torch_compile,
                          batch_size=cfg.reading.batch_size, decode=cfg.reading.decode)
    log.info("extracting with %s", plan.describe())
    reading = replace(cfg.reading, batch_size=plan.batch_size)
    with build_backbone_runner(files, plan) as runner, \
            TilePipeline(reading, cfg.tiling, planner, decode_device=plan.decode_device) as pipeline:
        px = cfg.tiling.tile.patch_size  # warm up: compilation and allocation before the first slide's clock
        runner.infer({"tiles": np.zeros((plan.batch_size, px, px, 3), np.uint8)})
        prepare_tile_sources(cfg.reading.tile_source)
        if plan.decode_device is not None:
            prepare_device_decode(plan.decode_device)
        extra = {"precision": plan.precision, "backend": runner.describe(),
                 "weights_sha256": card.weights_sha256}
        for stream in pipeline.run(todo):
            table.record(_extract_one(stream, runner, card, out, extra))


def _has_coords(coords_dir: Path, slide_id: str) -> bool:
    return find_coords(coords_dir, slide_id).is_file()


def _extract_one(stream: SlideStream, runner: Runner, card: BackboneCard, out: Path,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Run the backbone over one slide's batches and write its features file."""
    start = time.perf_counter()
    row: dict[str, Any] = {"slide_id": stream.entry.slide_id}
    try:
        if stream.error is not None:
            raise stream.error
        assert stream.plan is not None
        features, = backbone_features(stream, [runner], [card.feature_dim])
        coords = stream.plan.grid.coords[: stream.n_tiles]
        write_h5(features_path(out, stream.entry.slide_id), coords, stream.plan.attrs, features,
                 encoder=card.name, feature_attrs=extra)
        seconds = time.perf_counter() - start
        row.update(status="ok", error="", n_tiles=stream.n_tiles,
                   tiles_per_s=round(stream.n_tiles / seconds, 2) if seconds > 0 else 0.0)
    except FAILURES as exc:
        stream.drain()
        log.warning("%s: %s", stream.entry.slide_id, exc)
        row.update(status="error", error=error_text(exc))
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row

