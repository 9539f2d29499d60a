"""Worker processes start from a clean process (forkserver or spawn), never by forking one that has run
thread pools: training with DataLoader workers and tiling in a process pool after OpenVINO has run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.processes import worker_context
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort


def test_workers_never_start_by_fork() -> None:
    assert worker_context().get_start_method() in ("forkserver", "spawn")


@pytest.fixture(scope="module")
def openvino_has_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Run a backbone in OpenVINO in this process first: its thread pool is then alive in the parent."""
    pytest.importorskip("openvino")
    from slidemil.models.backbones import create_backbone
    from slidemil.models.onnx import export_backbone
    from slidemil.models.preprocess import UInt8Backbone
    from slidemil.runtime.openvino_runner import OpenVinoRunner

    torch.manual_seed(0)
    model, card = create_backbone("test_resnet")
    onnx = export_backbone(UInt8Backbone(model, card).eval(), tmp_path_factory.mktemp("ov") / "b.onnx", 64)
    with OpenVinoRunner(onnx, precision="fp32", threads=2, use_cache=False) as runner:
        out = runner.infer({"tiles": np.zeros((4, 64, 64, 3), np.uint8)})["features"]
    assert out.shape == (4, card.feature_dim)


def test_training_with_loader_workers_after_openvino(openvino_has_run: None, tmp_path: Path) -> None:
    root = make_feature_cohort(tmp_path / "feats", n_slides=16)
    with_workers = run_training(fast_config(root, **{"data.workers": 2, "optim.epochs": 3}), tmp_path / "w")[0]
    in_process = run_training(fast_config(root, **{"data.workers": 0, "optim.epochs": 3}), tmp_path / "p")[0]
    # the tiles each epoch draws depend on the seed, epoch and slide only: workers change nothing
    a = pd.read_csv(tmp_path / "w" / "metrics.csv")
    b = pd.read_csv(tmp_path / "p" / "metrics.csv")
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    assert with_workers.test_metrics["auc"] == pytest.approx(in_process.test_metrics["auc"])


def test_tiling_in_worker_processes_after_openvino(openvino_has_run: None, synth_cohort, tmp_path: Path) -> None:
    from slidemil.tile import tile_slides

    cohort, table = synth_cohort
    pooled = tile_slides(cohort / "slides", tmp_path / "pooled", workers=2)
    alone = tile_slides(cohort / "slides", tmp_path / "alone", workers=1)
    assert {r["status"] for r in pooled.rows.values()} == {"ok"} and len(pooled.rows) == len(table)
    for sid in table.slide_id:
        assert pooled.rows[sid]["n_tiles"] == alone.rows[sid]["n_tiles"] > 0
