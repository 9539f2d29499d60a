"""Checkpoint records: the h5 folder accepted as the features folder, and typed errors for missing or
malformed records wherever a checkpoint is read (export, extract --checkpoint, load_head)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from slidemil.artifacts.checkpoint import load_checkpoint_backbone, load_head, read_checkpoint
from slidemil.cli import main
from slidemil.errors import CheckpointError, LabelTableError
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import ParityConfig
from slidemil.features.extract import ExtractConfig, prepare_backbone
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort

QUICK = ExportConfig(parity=ParityConfig(n_tiles=8, batch_sizes=(1, 8), bag_sizes=(1, 20), n_slide_bags=2))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_feature_cohort(tmp_path_factory.mktemp("cohort"), n_slides=16)


@pytest.fixture(scope="module")
def trained_on_h5_folder(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with --features pointing at the h5 folder itself (FEAT/features)."""
    out = tmp_path_factory.mktemp("run")
    cfg = fast_config(cohort, **{"data.features": str(cohort / "features"), "optim.epochs": 2})
    run_training(cfg, out)
    return out


def test_h5_folder_trains_with_the_records_beside_it(trained_on_h5_folder: Path, cohort: Path) -> None:
    record = read_checkpoint(trained_on_h5_folder / "checkpoint_best")
    card = json.loads((cohort / "backbone" / "backbone_card.json").read_text())
    assert record.require_backbone().weights_sha256 == card["weights_sha256"]
    assert record.backbone_weights == "backbone/" and record.require_tiling().tile.patch_size == 256
    assert (trained_on_h5_folder / "backbone" / "backbone.safetensors").is_file()


def test_h5_folder_run_exports(trained_on_h5_folder: Path, tmp_path: Path) -> None:
    pkg = export_checkpoint(trained_on_h5_folder / "checkpoint_best", tmp_path / "model", QUICK)
    assert pkg.manifest.parity["onnxruntime_fp32"]["probabilities"]["max_abs"] <= 1e-4
    assert pkg.card.name == "test_resnet" and pkg.class_names == ("0", "1")


def _without_backbone_record(run: Path, dst: Path, **fields: object) -> Path:
    shutil.copytree(run, dst)
    path = dst / "checkpoint_best.json"
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta))
    return dst / "checkpoint_best"


def test_a_checkpoint_without_a_backbone_is_refused_by_every_reader(trained_on_h5_folder: Path,
                                                                    tmp_path: Path) -> None:
    ckpt = _without_backbone_record(trained_on_h5_folder, tmp_path / "run", backbone_card=None, backbone_weights=None)
    for read in (lambda: export_checkpoint(ckpt, tmp_path / "model", QUICK), lambda: load_checkpoint_backbone(ckpt),
                 lambda: prepare_backbone(ExtractConfig(checkpoint=str(ckpt)), tmp_path / "feats")):
        with pytest.raises(CheckpointError, match=r"records no backbone.*slidemil extract"):
            read()
    assert not (tmp_path / "model").exists()
    head, _ = load_head(ckpt)  # the head alone is still readable
    assert head.config is not None and head.config.n_classes == 2


def test_the_cli_reports_a_missing_backbone_as_an_error_with_the_fix(trained_on_h5_folder: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _without_backbone_record(trained_on_h5_folder, tmp_path / "run", backbone_card=None, backbone_weights=None)
    with caplog.at_level(logging.ERROR, logger="slidemil"):
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "model")]) == 2
    assert "records no backbone" in caplog.text and "slidemil extract" in caplog.text


@pytest.mark.parametrize("fields", [{"backbone_card": "resnet50"}, {"backbone_card": {"name": "x"}},
                                    {"head_config": {"mil_type": "gated", "in_dim": 16, "widths": 3}},
                                    {"tiling": [256]}, {"class_names": ["a", "b", "c"]}, {"mode": "other"}])
def test_malformed_records_are_typed_errors(trained_on_h5_folder: Path, tmp_path: Path, fields: dict) -> None:
    ckpt = _without_backbone_record(trained_on_h5_folder, tmp_path / "run", **fields)
    with pytest.raises(CheckpointError, match="another checkpoint or train again"):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError):
        export_checkpoint(ckpt, tmp_path / "model", QUICK)


def test_a_run_without_a_tiling_record_cannot_export(trained_on_h5_folder: Path, tmp_path: Path) -> None:
    ckpt = _without_backbone_record(trained_on_h5_folder, tmp_path / "run", tiling=None)
    with pytest.raises(CheckpointError, match=r"records no tiling.*slidemil tile"):
        export_checkpoint(ckpt, tmp_path / "model", QUICK)


def test_features_of_another_width_than_the_recorded_backbone_are_refused(tmp_path: Path) -> None:
    root = make_feature_cohort(tmp_path / "feats", n_slides=8, dim=16)  # the card records test_resnet, 96-d
    with pytest.raises(LabelTableError, match=r"16-d but .*'test_resnet' with 96-d"):
        run_training(fast_config(root, **{"optim.epochs": 1}), tmp_path / "run")
