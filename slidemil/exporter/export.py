"""`slidemil export`: a training checkpoint -> a self-describing model package.

The package is built in a temporary folder beside ``out_dir`` and renamed onto it when complete,
manifest last: a killed export leaves no half package. The backbone travels with the head: the
exporter builds the package from the backbone the checkpoint records and refuses weights whose
sha256 differs from the checkpoint's card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from slidemil import config
from slidemil.artifacts.checkpoint import Checkpoint
from slidemil.artifacts.package import (
    HEAD_CONFIG_FILE,
    HEAD_WEIGHTS_FILE,
    SCHEMA_VERSION,
    TORCH_DIR,
    TORCH_FILES,
    InputSpec,
    Manifest,
    MilSpec,
    Package,
    graph_file,
    library_versions,
    load_package,
    utc_now,
    write_manifest,
)
from slidemil.atomic import TMP_MARK, atomic_path, temporary_dir, write_json
from slidemil.choices import Exporter
from slidemil.errors import ConfigError, ExportError
from slidemil.exporter.parity import (
    FIDELITY_TARGET,
    ParityConfig,
    fit_profiles,
    measure_parity,
    parity_tiles,
    summary,
    tolerance_for,
)
from slidemil.models.backbones import CARD_FILE, BackboneCard, save_backbone, state_dict_sha256, unshared
from slidemil.models.mil import BagHead, HeadConfig, MILHead
from slidemil.models.onnx import DEFAULT_OPSET, export_backbone, export_head
from slidemil.models.preprocess import UInt8Backbone
from slidemil.runtime.plan import ExecutionPlan, ModelFiles, build_runners
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)

BACKBONE_FOLDER = "backbone"  # beside a features-mode checkpoint


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``slidemil export``.

    Attributes:
        opset: ONNX opset of both graphs.
        exporter: ``auto`` (dynamo, then the TorchScript-based one), ``dynamo`` or ``legacy``.
        fp16: also write ``backbone_fp16.onnx`` / ``head_fp16.onnx`` (for ONNX Runtime CUDA).
        max_batch: the largest backbone batch the engine will send (recorded; TensorRT profile max).
        tensorrt: also build TensorRT engines (needs TensorRT and a GPU).
        overwrite: replace an existing package at the output folder.
        parity: how parity is measured (tiles, batch and bag sizes, slide).
        trt_precisions: precisions of the TensorRT engines.
        workspace_gb: TensorRT builder workspace limit.
    """

    opset: int = DEFAULT_OPSET
    exporter: Exporter = "auto"
    fp16: bool = False
    max_batch: int = 256
    tensorrt: bool = False
    overwrite: bool = False
    parity: ParityConfig = field(default_factory=ParityConfig)
    trt_precisions: tuple[str, ...] = ("fp16",)
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")


@dataclass(frozen=True)
class ExportSource:
    """What a checkpoint holds for export: the two models and what the package must record."""

    backbone: nn.Module
    card: BackboneCard
    head: MILHead
    head_config: HeadConfig
    class_names: tuple[str, ...]
    tiling: TilingConfig
    provenance: dict[str, Any]
    operating_point: dict[str, Any] | None = None


def load_source(checkpoint: str | Path) -> ExportSource:
    """Load a checkpoint's head and backbone, checking that the backbone is the one it records.

    Raises:
        ExportError: the backbone weights' sha256 differs from the checkpoint's card, or the class
            names do not fit the head.
        CheckpointError, WeightsError: from the checkpoint reader.
    """
    ckpt = Checkpoint.open(checkpoint)  # the record and the weights are each read once
    record = ckpt.record
    checkpoint, meta = record.base, record.raw
    recorded = record.require_backbone()
    tiling = record.require_tiling()
    folder_card = checkpoint.parent / BACKBONE_FOLDER / CARD_FILE
    if record.backbone_weights != "inside" and folder_card.is_file():
        _same_backbone(json.loads(folder_card.read_text()).get("weights_sha256"), recorded, str(folder_card))
    backbone, card = ckpt.backbone()
    _same_backbone(state_dict_sha256(backbone), recorded, f"the backbone weights loaded for {checkpoint.name}")
    head = ckpt.head()
    if record.head_config.in_dim != card.feature_dim:
        raise ExportError(f"{checkpoint.name}: the head takes {record.head_config.in_dim}-d features but the backbone "
                          f"it records ({card.name}) gives {card.feature_dim}-d ones; the features it was trained on "
                          "came from another backbone: extract them with `slidemil extract` and train again")
    provenance = {"checkpoint": checkpoint.name, "mode": record.mode, "epoch": record.epoch,
                  "metrics": meta.get("metrics"), "backbone_weights": record.backbone_weights,
                  "checkpoint_files": meta.get("files"), "trained_with": meta.get("slidemil_version")}
    return ExportSource(backbone.eval(), card, head.eval(), record.head_config, record.class_names, tiling, provenance,
                        operating_point(meta, record.class_names))


def operating_point(meta: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any] | None:
    """The checkpoint's operating point (None when it has none), checked against its class names."""
    op = meta.get("operating_point")
    if op is None:
        return None
    try:
        index, threshold = int(op["class_index"]), float(op["threshold"])
        ok = 0 <= index < len(class_names) and class_names[index] == op["class"] and 0.0 <= threshold <= 1.0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ExportError(f"the checkpoint's operating_point {op!r} does not fit its classes {list(class_names)}; "
                          "the record was edited: remove the field or train again")
    return dict(op)


def _same_backbone(found: str | None, recorded: BackboneCard, where: str) -> None:
    if found != recorded.weights_sha256:
        raise ExportError(
            f"backbone mismatch: {where} has weights sha256 {found} but the checkpoint was trained on features "
            f"of {recorded.name} with weights sha256 {recorded.weights_sha256}. A head only works with the "
            "backbone its features came from: export with the backbone folder of that features run")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, cfg: ExportConfig = ExportConfig()) -> Package:
    """Export ``checkpoint`` as a model package in ``out_dir`` (graphs, torch weights, parity, manifest).

    Raises:
        ExportError: the output exists (without ``overwrite``), the backbone differs from the one
            the checkpoint records, an exporter failed, or parity is worse than the tolerance.
        BackendUnavailableError: ``tensorrt`` without TensorRT or a GPU (checked before exporting).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    _check_target(out, cfg.overwrite)
    if cfg.tensorrt:
        from slidemil.runtime.tensorrt_runner import import_tensorrt
        import_tensorrt()
    source = load_source(checkpoint)
    tmp = temporary_dir(out)
    try:
        manifest = build_package(source, tmp, cfg)
        export_info = {**manifest.export, "seconds": round(time.perf_counter() - started, 2)}
        write_manifest(tmp, dataclasses.replace(manifest, export=export_info))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s in %.1f s", Path(checkpoint).name, out, time.perf_counter() - started)
    return load_package(out)


def build_package(src: ExportSource, root: Path, cfg: ExportConfig) -> Manifest:
    """Write graphs, torch weights (and engines) into ``root``; the manifest to write, without files."""
    module, head = UInt8Backbone(src.backbone, src.card).eval(), BagHead(src.head)
    px = src.tiling.tile.patch_size
    if px != src.card.input_size:
        log.info("tiles are %d px (the tiling's patch_size) while %s's card says %d: the graph takes %d px tiles, "
                 "as feature extraction fed them", px, src.card.name, src.card.input_size, px)
    save_torch_weights(root, src)
    export_backbone(module, root / graph_file("backbone"), px, cfg.opset, cfg.exporter)
    export_head(head, root / graph_file("head"), src.card.feature_dim, cfg.opset, cfg.exporter)
    graphs = {kind: {"fp32": graph_file(kind)} for kind in ("backbone", "head")}
    if cfg.fp16:
        from slidemil.exporter.fp16 import CONVERTER, convert_to_fp16
        for kind in graphs:
            graphs[kind]["fp16"] = convert_to_fp16(root / graph_file(kind), root / graph_file(kind, "fp16")).name
    parity_cfg = fit_profiles(cfg.parity, cfg.max_batch, {})
    tiles, tile_source = parity_tiles(src.tiling, px, parity_cfg.n_tiles, parity_cfg.slide, parity_cfg.seed)
    parity = export_parity(root, module, head, src.card.feature_dim, graphs, tiles, parity_cfg)
    parity = {"reference": "torch fp32 (cpu)", "tiles": tile_source, "n_tiles": len(tiles), "tile_px": px,
              "fidelity_target": FIDELITY_TARGET, **parity}
    tensorrt = None
    if cfg.tensorrt:
        from slidemil.exporter.tensorrt import TensorRTConfig, build_engines
        trt_cfg = TensorRTConfig(precisions=cfg.trt_precisions, max_batch=cfg.max_batch, workspace_gb=cfg.workspace_gb)
        tensorrt = build_engines(root, px, src.card.feature_dim, trt_cfg, tiles, cfg.parity)
    export_info = {**src.provenance, "config": config.to_dict(cfg)}
    if cfg.fp16:
        export_info["fp16_converter"] = CONVERTER
    hc = src.head_config
    mil = MilSpec(type=hc.mil_type, in_dim=hc.in_dim, n_classes=hc.n_classes, hidden_dim=hc.hidden_dim,
                  attention_dim=hc.attention_dim, temperature=float(src.head.temperature), n_heads=hc.n_heads,
                  landmarks=hc.landmarks, pinv_iterations=hc.pinv_iterations, outputs=head.output_names,
                  ensemble=hc.ensemble, slide_contrast=hc.slide_contrast,
                  member_contrast=hc.member_contrast)
    normalisation = {"scale": 1 / 255, "mean": list(src.card.mean), "std": list(src.card.std),
                     "formula": "(x / 255 - mean) / std, per RGB channel"}
    return Manifest(
        schema_version=SCHEMA_VERSION, created=utc_now(), class_names=src.class_names, tile=src.tiling.tile,
        tissue=src.tiling.tissue, backbone=src.card,
        input=InputSpec(name="tiles", shape=("batch", px, px, 3), normalisation_in_graph=normalisation),
        mil=mil, opset=cfg.opset, max_batch=cfg.max_batch, graphs=graphs, torch=dict(TORCH_FILES), files={},
        library_versions=library_versions(), parity=parity, export=export_info, tensorrt=tensorrt,
        operating_point=src.operating_point)


def save_torch_weights(root: Path, src: ExportSource) -> None:
    """``torch/``: the backbone (weights + card) and the head (weights + config) for the torch runner."""
    folder = root / TORCH_DIR
    card = save_backbone(src.backbone, src.card, folder)
    if card.weights_sha256 != src.card.weights_sha256:
        raise ExportError("the backbone changed while exporting (sha256 differs from its card)")
    with atomic_path(folder / HEAD_WEIGHTS_FILE) as tmp:
        save_file(unshared(src.head.state_dict()), str(tmp))
    write_json(folder / HEAD_CONFIG_FILE, src.head_config.to_dict())


def export_parity(root: Path, module: nn.Module, head: nn.Module, feature_dim: int, graphs: dict[str, dict[str, str]],
                  tiles: Any, cfg: ParityConfig) -> dict[str, Any]:
    """Torch fp32 vs ONNX Runtime (CPU) as the engine runs the graphs, for every backbone precision exported;
    ExportError if one misses its tolerance."""
    files = ModelFiles(root.name, int(tiles.shape[1]), feature_dim,
                       {kind: {p: root / rel for p, rel in by_precision.items()} for kind, by_precision in graphs.items()},
                       torch_models=lambda: (module, head))
    figures = {}
    with build_runners(files, ExecutionPlan("torch", "cpu", "fp32", head="torch")) as ref:
        for precision in graphs["backbone"]:
            with build_runners(files, ExecutionPlan("onnxruntime", "cpu", precision)) as cand:
                result = measure_parity(ref, cand, tiles, cfg, tolerance_for(precision))
            log.info("parity onnxruntime %s vs torch fp32: %s", precision, summary(result))
            if not result["passed"]:
                raise ExportError(f"ONNX {precision} graphs do not reproduce the torch model: {summary(result)}. "
                                  "Try the other exporter (--exporter legacy or dynamo) or another --opset")
            figures[f"onnxruntime_{precision}"] = result
    return figures


def _check_target(out: Path, overwrite: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{TMP_MARK}{out.name}-*"):
        if stale.is_dir():  # left by a killed export
            log.info("removing %s left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new --out or pass --force to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished package onto ``out`` (replacing an old one in two renames)."""
    old = None
    if out.exists():
        old = out.parent / f"{TMP_MARK}{out.name}-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
