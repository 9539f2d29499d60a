"""Exporter: checkpoint -> model package (ONNX graphs, torch weights, manifest), parity, verify."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from slidemil import config
from slidemil.artifacts.checkpoint import save_checkpoint
from slidemil.artifacts.package import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    load_package,
    load_torch_models,
    sha256_file,
)
from slidemil.cli import main
from slidemil.errors import ExportError, PackageError
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import ParityConfig, parity_tiles
from slidemil.exporter.verify import verify_package
from slidemil.models.backbones import create_backbone, save_backbone
from slidemil.models.mil import BagHead, HeadConfig, create_head
from slidemil.models.preprocess import UInt8Backbone
from slidemil.runtime.plan import ModelFiles, resolve_precision
from slidemil.slide.grid import TileSpec
from slidemil.slide.tiling import TilingConfig

TILE_PX = 64
CLASSES = ["normal", "tumour"]
TILING = TilingConfig(tile=TileSpec(patch_size=TILE_PX, mpp=0.5, overlap=0, min_tissue=0.25))
QUICK = ParityConfig(n_tiles=16, batch_sizes=(1, 7, 16), bag_sizes=(1, 50), n_slide_bags=4)


def make_checkpoint(root: Path, mode: str = "features", mil: str = "gated", seed: int = 0,
                    backbone_name: str = "test_resnet") -> Path:
    """A checkpoint in the trainer's format: a backbone (test_resnet) + a small head, temperature 1.5."""
    torch.manual_seed(seed)
    backbone, card = create_backbone(backbone_name)
    head = create_head(HeadConfig(mil_type=mil, in_dim=card.feature_dim, n_classes=len(CLASSES),
                                  hidden_dim=32, attention_dim=16))
    head.temperature.fill_(1.5)
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    if mode == "features":
        card, where = save_backbone(backbone, card, root / "backbone"), "backbone/"
    else:
        state.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
        where = "inside"
    meta = {"mode": mode, "epoch": 3, "metrics": {"val_auc": 0.9}, "class_names": CLASSES,
            "head_config": head.config.to_dict(), "backbone_card": card.to_dict(), "backbone_weights": where,
            "tiling": config.to_dict(TILING), "train_config": {}}
    return save_checkpoint(root / "checkpoint_best", state, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One features-mode checkpoint exported with fp16 graphs and the default parity sizes."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "run")
    pkg = export_checkpoint(ckpt.with_suffix(".safetensors"), root / "model", ExportConfig(fp16=True))
    return ckpt, pkg


@pytest.fixture
def package_copy(exported, tmp_path):
    _, pkg = exported
    dst = tmp_path / "model"
    shutil.copytree(pkg.root, dst)
    return dst


def test_package_holds_graphs_torch_weights_and_manifest(exported):
    _, pkg = exported
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert pkg.root.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others, as any new folder (not 0700)
    names = {p.relative_to(pkg.root).as_posix() for p in pkg.root.rglob("*") if p.is_file()}
    assert names == {MANIFEST_FILE, "backbone.onnx", "head.onnx", "backbone_fp16.onnx", "head_fp16.onnx",
                     "torch/backbone.safetensors", "torch/backbone_card.json", "torch/head.safetensors",
                     "torch/head_config.json"}
    assert set(pkg.manifest.files) == names - {MANIFEST_FILE}
    for rel, entry in pkg.manifest.files.items():
        assert entry.sha256 == sha256_file(pkg.root / rel) and entry.bytes == (pkg.root / rel).stat().st_size
    assert not list(pkg.root.parent.glob(".tmp-*")), "no temporary folder is left beside the package"


def test_manifest_carries_what_the_engine_needs(exported):
    ckpt, pkg = exported
    m = json.loads((pkg.root / MANIFEST_FILE).read_text())
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION == 1
    assert m["class_names"] == CLASSES
    assert m["tile"] == {"patch_size": TILE_PX, "mpp": 0.5, "overlap": 0, "min_tissue": 0.25, "allow_upsample": False}
    assert m["tissue"] == meta["tiling"]["tissue"]
    for key in ("name", "timm_name", "feature_dim", "input_size", "weights_sha256", "weights_source"):
        assert m["backbone"][key] == meta["backbone_card"][key]
    assert m["input"]["dtype"] == "uint8" and m["input"]["layout"] == "NHWC" and m["input"]["channels"] == "RGB"
    assert m["input"]["shape"] == ["batch", TILE_PX, TILE_PX, 3]
    assert m["input"]["normalisation_in_graph"]["mean"] == list(meta["backbone_card"]["mean"])
    assert m["input"]["normalisation_in_graph"]["std"] == list(meta["backbone_card"]["std"])
    assert m["mil"] == {"type": "gated", "in_dim": 96, "n_classes": 2, "hidden_dim": 32, "attention_dim": 16,
                        "temperature": 1.5, "n_heads": 8, "landmarks": 128, "pinv_iterations": 6,
                        "outputs": ["logits", "probabilities", "attention", "attention_raw"], "ensemble": 1,
                        "slide_contrast": False, "member_contrast": []}
    assert m["operating_point"] is None  # the checkpoint records none
    assert m["opset"] == 18 and m["graphs"]["backbone"] == {"fp32": "backbone.onnx", "fp16": "backbone_fp16.onnx"}
    assert {"slidemil", "torch", "onnx", "onnxruntime", "timm"} <= set(m["library_versions"])
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert m["export"]["checkpoint"] == "checkpoint_best" and m["export"]["epoch"] == 3
    assert m["tensorrt"] is None
    # what load_package hands the engine
    assert pkg.tiling == TILING and pkg.class_names == tuple(CLASSES) and pkg.tile_px == TILE_PX
    assert pkg.card.to_dict() == meta["backbone_card"]
    assert pkg.head_config == HeadConfig.from_dict(meta["head_config"])
    assert pkg.backbone_onnx.is_file() and pkg.head_onnx.is_file()
    # what the planner makes of it: fp16 graphs on a GPU, fp32 on the CPU, no TensorRT engine
    files = ModelFiles.from_package(pkg)
    assert resolve_precision(files, "onnxruntime", "cuda") == "fp16"
    assert resolve_precision(files, "onnxruntime", "cpu") == "fp32"
    assert files.precisions("tensorrt", "cuda") == ()


def test_parity_figures_meet_the_thresholds(exported):
    _, pkg = exported
    parity = pkg.manifest.parity
    assert parity["tiles"].startswith("synthetic slide") and parity["n_tiles"] == 64
    fp32, fp16 = parity["onnxruntime_fp32"], parity["onnxruntime_fp16"]
    assert fp32["passed"] and fp32["probabilities"]["max_abs"] <= 1e-5  # the design's fidelity target
    assert fp32["argmax_agreement"] == 1.0 and fp32["features"]["max_rel"] < 1e-5
    assert fp32["features"]["batch_sizes"] == [1, 7, 64] and fp32["head"]["bag_sizes"] == [1, 500, 20_000]
    assert fp32["n_bags"] == 1 + 32 + 3
    assert fp16["passed"] and fp16["probabilities"]["max_abs"] <= 1e-2 and fp16["tolerance"] == 1e-2


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_of_the_backbone_graph(exported, batch):
    _, pkg = exported
    backbone, _ = load_torch_models(pkg)
    tiles = np.random.default_rng(batch).integers(0, 256, (batch, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(pkg.backbone_onnx), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"tiles": tiles})
    with torch.no_grad():
        ref = backbone(torch.from_numpy(tiles)).numpy()
    assert out.shape == (batch, 96) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n", [1, 500, 20_000])
def test_dynamic_bag_size_of_the_head_graph(exported, n):
    _, pkg = exported
    _, head = load_torch_models(pkg)
    features = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32)
    session = ort.InferenceSession(str(pkg.head_onnx), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"features": features})))
    with torch.no_grad():
        ref = dict(zip(("logits", "probabilities", "attention", "attention_raw"), head(torch.from_numpy(features))))
    assert outs["attention"].shape == (n,) and outs["probabilities"].shape == (2,)
    np.testing.assert_allclose(outs["probabilities"], ref["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_allclose(outs["attention"], ref["attention"].numpy(), atol=1e-7)
    assert np.argmax(outs["probabilities"]) == int(ref["probabilities"].argmax())


def test_uint8_graph_equals_torch_with_the_cards_normalisation(exported):
    _, pkg = exported
    tiles, source = parity_tiles(pkg.tiling, TILE_PX, 8, seed=3)
    assert source.startswith("synthetic slide") and tiles.dtype == np.uint8
    backbone, _ = load_torch_models(pkg)
    mean, std = np.array(pkg.card.mean), np.array(pkg.card.std)
    normalised = ((tiles / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    with torch.no_grad():
        ref = backbone.backbone(torch.from_numpy(np.ascontiguousarray(normalised))).numpy()
    session = ort.InferenceSession(str(pkg.backbone_onnx), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"tiles": tiles})
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_torch_runner_runs_from_the_package_alone(exported, tmp_path):
    ckpt, pkg = exported
    moved = tmp_path / "elsewhere"
    shutil.copytree(pkg.root, moved)
    backbone, head = load_torch_models(load_package(moved))
    assert isinstance(backbone, UInt8Backbone) and isinstance(head, BagHead) and not head.training
    assert float(head.head.temperature) == 1.5
    tiles = np.random.default_rng(0).integers(0, 256, (3, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(moved / "backbone.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(backbone(torch.from_numpy(tiles)).numpy(), session.run(None, {"tiles": tiles})[0],
                                   rtol=1e-4, atol=1e-5)


def test_tampered_file_is_refused(package_copy):
    path = package_copy / "head.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"head\.onnx.*sha256.*re-export"):
        load_package(package_copy)
    with pytest.raises(PackageError, match="head.onnx"):
        verify_package(package_copy, parity=None)
    assert main(["verify", str(package_copy), "--no-parity"]) == 2


def test_missing_file_is_refused(package_copy):
    (package_copy / "torch" / "head.safetensors").unlink()
    with pytest.raises(PackageError, match=r"head\.safetensors is listed .* but missing"):
        load_package(package_copy)


def test_unknown_schema_is_refused(package_copy):
    manifest = json.loads((package_copy / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 2
    (package_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="schema_version 2.*reads schema 1"):
        load_package(package_copy)


def test_folder_without_manifest_is_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)


def test_backbone_with_other_weights_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    recorded = json.loads(ckpt.with_suffix(".json").read_text())["backbone_card"]["weights_sha256"]
    torch.manual_seed(1)
    other, card = create_backbone("test_resnet")
    shutil.rmtree(tmp_path / "run" / "backbone")
    found = save_backbone(other, card, tmp_path / "run" / "backbone").weights_sha256
    with pytest.raises(ExportError, match=f"(?s){found}.*{recorded}"):
        export_checkpoint(ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_end_to_end_checkpoint_with_simple_head_exports(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", mode="end2end", mil="simple")
    pkg = export_checkpoint(ckpt, tmp_path / "model", ExportConfig(parity=QUICK, exporter="legacy"))
    assert pkg.manifest.export["checkpoint_files"] == json.loads(ckpt.with_suffix(".json").read_text())["files"]
    assert pkg.manifest.mil.type == "simple" and pkg.manifest.export["mode"] == "end2end"
    assert pkg.manifest.parity["onnxruntime_fp32"]["probabilities"]["max_abs"] <= 1e-5
    assert verify_package(pkg.root, parity=QUICK).ok


def test_existing_package_is_kept_unless_forced(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(ckpt, out, ExportConfig(parity=QUICK))
    export_checkpoint(ckpt, out, ExportConfig(parity=QUICK, overwrite=True, exporter="legacy"))
    assert not (out / "keep.txt").exists() and load_package(out).manifest.files


def test_failed_parity_leaves_no_half_package(tmp_path, monkeypatch):
    import slidemil.exporter.export as export_module
    ckpt = make_checkpoint(tmp_path / "run")
    monkeypatch.setattr(export_module, "tolerance_for", lambda precision: -1.0)
    with pytest.raises(ExportError, match="do not reproduce the torch model"):
        export_checkpoint(ckpt, tmp_path / "model", ExportConfig(parity=QUICK, exporter="legacy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_verify_onnxruntime_reports_parity_against_torch(exported):
    _, pkg = exported
    report = verify_package(pkg.root, parity=QUICK)
    assert report.ok, report.lines()
    assert [c.status for c in report.checks] == ["ok", "ok", "ok", "ok"]  # checksums, fp32, fp16, torch
    assert report.parity["reference"].startswith("torch fp32") and report.parity["precision"] == "fp32"
    assert report.parity["probabilities"]["max_abs"] <= 1e-4


@pytest.mark.parametrize(("precision", "tolerance"), [("bf16", 1e-2), ("fp32", 1e-4)])
def test_verify_openvino_meets_its_tolerances(exported, precision, tolerance, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="openvino is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, pkg = exported
    report = verify_package(pkg.root, backend="openvino", precision=precision)
    assert report.ok, report.lines()
    figures = report.parity
    assert figures["reference"] == "onnxruntime fp32 (cpu)" and figures["candidate"] == f"openvino {precision}"
    assert figures["probabilities"]["max_abs"] <= tolerance and figures["argmax_agreement"] == 1.0
    assert figures["tiles"].startswith("synthetic slide")


@pytest.mark.slow
def test_openvino_meets_its_tolerances_on_resnet50_trunc(tmp_path, monkeypatch):
    """The production CPU path: resnet50_trunc (random weights) on real tiles of a synthetic slide."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ckpt = make_checkpoint(tmp_path / "run", backbone_name="resnet50_trunc")
    pkg = export_checkpoint(ckpt.with_suffix(".safetensors"), tmp_path / "model", ExportConfig(parity=QUICK))
    for precision, tolerance in (("bf16", 1e-2), ("fp32", 1e-4)):
        report = verify_package(pkg.root, backend="openvino", precision=precision, parity=QUICK)
        assert report.ok, report.lines()
        figures = report.parity
        assert figures["probabilities"]["max_abs"] <= tolerance and figures["argmax_agreement"] == 1.0, figures


def test_cli_export_then_verify(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    out = tmp_path / "model"
    settings = tmp_path / "export.yaml"
    settings.write_text("exporter: legacy\nparity:\n  n_tiles: 16\n  bag_sizes: [1, 50]\n  n_slide_bags: 4\n")
    assert main(["export", "--checkpoint", str(ckpt.with_suffix(".json")), "--out", str(out), "--max-batch", "16",
                 "--config", str(settings)]) == 0
    manifest = load_package(out).manifest
    assert manifest.max_batch == 16 and manifest.export["config"]["exporter"] == "legacy"
    assert manifest.parity["onnxruntime_fp32"]["features"]["batch_sizes"] == [1, 7, 16]
    assert manifest.parity["onnxruntime_fp32"]["head"]["bag_sizes"] == [1, 50]
    assert main(["verify", str(out)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2  # exists, no --force
