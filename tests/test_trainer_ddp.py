"""``torchrun --nproc_per_node 2 -m slidemil train`` (gloo, CPU) equals one process at the same
effective batch: 2 ranks x 1 bag against 1 process x 2 bags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"optim.epochs": 3, "data.max_patches": 20, "model.dropout": 0.0}  # dropout draws differ per rank


@pytest.mark.timeout(120)
def test_two_rank_gloo_run_matches_single_process(tmp_path: Path) -> None:
    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=24)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slidemil", "train", "--metadata", str(cohort / "metadata.csv"), "--features", str(cohort),
           "--out", str(tmp_path / "ddp"), "--batch-size", "1", "--epochs", "3", "--max-patches", "20",
           "--dropout", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("epoch 3/3") == 1, "only rank 0 logs"

    cfg = fast_config(cohort, **SETTINGS, **{"data.batch_size": 2})
    (single,) = run_training(cfg, tmp_path / "single")

    ddp_rows, one_rows = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("ddp", "single"))
    cols = [c for c in one_rows.columns if c not in ("seconds", "bags_per_s")]
    pd.testing.assert_frame_equal(ddp_rows[cols], one_rows[cols], rtol=1e-4, atol=1e-5)
    ddp_test = json.loads((tmp_path / "ddp" / "test_metrics.json").read_text())
    assert ddp_test["n"] == single.test_metrics["n"]  # every test slide evaluated once
    assert ddp_test["loss"] == pytest.approx(single.test_metrics["loss"], abs=1e-5)
    a = load_file(tmp_path / "ddp" / "checkpoint_last.safetensors")
    b = load_file(tmp_path / "single" / "checkpoint_last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)
    ddp_pred = pd.read_csv(tmp_path / "ddp" / "test_predictions.csv")
    one_pred = pd.read_csv(tmp_path / "single" / "test_predictions.csv")
    pd.testing.assert_frame_equal(ddp_pred, one_pred, rtol=1e-4, atol=1e-5)
