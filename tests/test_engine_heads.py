"""The engine with the new heads: one heatmap per class for heads that have them, and the package's
operating threshold deciding ``pred_class`` (probabilities untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.artifacts.checkpoint import save_checkpoint
from slidemil.artifacts.package import MANIFEST_FILE, load_package
from slidemil.config import to_dict
from slidemil.engine.head_only import open_head
from slidemil.engine.outputs import class_map_id
from slidemil.engine.score import ScoreConfig, score_slides
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import ParityConfig
from slidemil.models.backbones import create_backbone, save_backbone
from slidemil.models.mil import PER_CLASS_OUTPUT, HeadConfig, create_head
from slidemil.slide.synth import write_slide
from slidemil.slide.tiling import TilingConfig

CLASSES = ["normal", "type a", "type/b"]  # names that are not file-name safe, on purpose
QUICK_PARITY = ParityConfig(n_tiles=8, batch_sizes=(1, 8), bag_sizes=(1, 40), n_slide_bags=2)


def _package(root: Path, mil_type: str, class_names: list[str], operating_point: dict | None = None,
             ensemble: int = 1) -> Path:
    """A package of a randomly initialised head (or ensemble of heads) on the test backbone, exported as
    `slidemil export` does."""
    torch.manual_seed(0)
    model, card = create_backbone("test_resnet")
    card = save_backbone(model, card, root / "run" / "backbone")
    head = create_head(HeadConfig(mil_type=mil_type, in_dim=card.feature_dim, n_classes=len(class_names),
                                  hidden_dim=32, attention_dim=16, dropout=0.0, ensemble=ensemble))
    meta = {"mode": "features", "epoch": 0, "metrics": {}, "class_names": class_names,
            "head_config": head.config.to_dict(), "backbone_card": card.to_dict(), "backbone_weights": "backbone/",
            "tiling": to_dict(TilingConfig()), "train_config": {}}
    if operating_point is not None:
        meta["operating_point"] = operating_point
    base = save_checkpoint(root / "run" / "checkpoint_best", {f"head.{k}": v for k, v in head.state_dict().items()},
                           meta)
    export_checkpoint(base, root / "model", ExportConfig(parity=QUICK_PARITY))
    return root / "model"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    write_slide(folder / "lesion.svs", size=2048, label=2, n_classes=3, lesion_fraction=0.1,
                rng=np.random.default_rng(3))
    return folder


@pytest.fixture(scope="module")
def clam_mb(tmp_path_factory) -> Path:
    return _package(tmp_path_factory.mktemp("clam_mb"), "clam_mb", CLASSES)


def test_score_writes_one_heatmap_per_class(clam_mb: Path, slides: Path, tmp_path: Path) -> None:
    manifest = load_package(clam_mb).manifest
    assert manifest.mil.type == "clam_mb" and PER_CLASS_OUTPUT in manifest.mil.outputs
    assert "attention_per_class" in manifest.parity["onnxruntime_fp32"]["head"]  # parity covers the maps
    score_slides([clam_mb], slides, tmp_path, ScoreConfig(backend="onnxruntime", device="cpu", top_k=2))
    row = pd.read_csv(tmp_path / "predictions.csv").iloc[0]
    assert row.status == "ok"
    main = np.load(tmp_path / "heatmaps" / "lesion.npy")
    maps = {}
    for name in CLASSES:
        stem = class_map_id("lesion", name)
        assert "/" not in stem and " " not in stem
        for suffix in (".npy", ".json", ".png"):
            assert (tmp_path / "heatmaps" / f"{stem}{suffix}").is_file(), stem + suffix
        maps[name] = np.load(tmp_path / "heatmaps" / f"{stem}.npy")
        assert maps[name].shape == main.shape
        np.testing.assert_array_equal(np.isfinite(maps[name]), np.isfinite(main))
        sidecar = json.loads((tmp_path / "heatmaps" / f"{stem}.json").read_text())
        assert sidecar["attention_norm"] == "percentile"
    # the slide's map is the predicted class's map (what CLAM's heatmaps draw)
    np.testing.assert_allclose(maps[row.pred_class], main, equal_nan=True)
    assert not all(np.allclose(maps[CLASSES[0]], maps[c], equal_nan=True) for c in CLASSES[1:])


def test_heatmap_from_features_writes_them_too(clam_mb: Path, slides: Path, tmp_path: Path) -> None:
    """`slidemil heatmap` on stored features: the same per-class files as score."""
    from slidemil.engine.heatmap_from_features import HeatmapConfig, heatmaps_from_features
    from slidemil.features.extract import ExtractConfig, extract_features
    from slidemil.tile import tile_slides

    tile_slides(slides, tmp_path / "tiles")
    card = json.loads((clam_mb / "torch" / "backbone_card.json").read_text())
    assert card["name"] == "test_resnet"
    extract_features(slides, tmp_path / "feats", ExtractConfig(checkpoint=str(clam_mb.parent / "run" /
                                                                               "checkpoint_best"),
                                                               backend="torch", precision="fp32"),
                     coords_dir=tmp_path / "tiles")
    heatmaps_from_features(tmp_path / "feats", clam_mb, tmp_path / "out", HeatmapConfig(top_k=0), slides=slides)
    for name in CLASSES:
        assert (tmp_path / "out" / "heatmaps" / f"{class_map_id('lesion', name)}.npy").is_file()


def test_the_engine_applies_the_operating_threshold(slides: Path, tmp_path: Path) -> None:
    op = {"class": "tumour", "class_index": 1, "threshold": 0.0, "chosen_on": "test", "criterion": "x", "rule": "x"}
    model = _package(tmp_path / "a", "gated", ["normal", "tumour"], operating_point=op)
    assert load_package(model).manifest.operating_point == op  # the checkpoint's record travels into the manifest
    never = tmp_path / "never"
    shutil.copytree(model, never)  # the manifest is not checksummed: edit its operating point
    manifest = json.loads((never / MANIFEST_FILE).read_text())
    manifest["operating_point"] = {**op, "threshold": 1.0}
    (never / MANIFEST_FILE).write_text(json.dumps(manifest))
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    manifest["operating_point"] = None
    (plain / MANIFEST_FILE).write_text(json.dumps(manifest))
    rows = {}
    for name, package in (("always", model), ("never", never), ("plain", plain)):
        score_slides([package], slides, tmp_path / f"out_{name}", ScoreConfig(backend="onnxruntime", device="cpu",
                                                                              top_k=0, geojson=False,
                                                                              viewer_files=False))
        rows[name] = pd.read_csv(tmp_path / f"out_{name}" / "predictions.csv").iloc[0]
        recorded = json.loads((tmp_path / f"out_{name}" / "score_config.json").read_text())["operating_point"]
        assert recorded == (None if name == "plain" else load_package(package).manifest.operating_point)
    p = rows["plain"]["prob_tumour"]
    assert 0.0 < p < 1.0
    assert rows["always"].pred_class == "tumour" and rows["never"].pred_class == "normal"
    assert rows["plain"].pred_class == ("tumour" if p >= rows["plain"]["prob_normal"] else "normal")
    for name in ("always", "never"):  # the probabilities never change
        assert rows[name]["prob_tumour"] == pytest.approx(p, abs=1e-7)
    with open_head(never) as head:  # `slidemil heatmap` reads the same record
        assert head.operating_point is not None and head.operating_point["threshold"] == 1.0


def test_a_manifest_written_before_the_new_heads_still_loads(tmp_path: Path) -> None:
    model = _package(tmp_path, "gated", ["normal", "tumour"])
    manifest = json.loads((model / MANIFEST_FILE).read_text())
    for key in ("n_heads", "landmarks", "pinv_iterations", "outputs", "ensemble"):
        del manifest["mil"][key]
    del manifest["operating_point"]
    (model / MANIFEST_FILE).write_text(json.dumps(manifest))
    package = load_package(model)
    assert package.manifest.operating_point is None and package.head_config.mil_type == "gated"
    assert package.head_config.ensemble == 1
    assert package.manifest.mil.outputs == ("logits", "probabilities", "attention", "attention_raw")
    with open_head(model) as head:
        out = head.runner.infer({"features": np.zeros((3, head.in_dim), np.float32)})
    assert PER_CLASS_OUTPUT not in out and out["attention"].shape == (3,)
