"""``--calibrate``: a temperature fitted on the validation slides, stored in the best checkpoint's head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.artifacts.checkpoint import load_head, read_checkpoint_meta
from slidemil.slide.store import read_h5
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cohort the head separates with confidence, whose validation labels are partly wrong: the
    trained head is overconfident on the validation slides."""
    root = make_feature_cohort(tmp_path_factory.mktemp("cal"), n_slides=40, slides_per_patient=1, backbone=False)
    table = pd.read_csv(root / "metadata.csv", dtype={"slide_id": str})
    table["split"] = ["train"] * 16 + ["val"] * 16 + ["test"] * 8
    flip = table.index[table["split"] == "val"][:4]  # 2 slides of each class (labels alternate)
    table.loc[flip, "label"] = 1 - table.loc[flip, "label"]
    table.to_csv(root / "metadata.csv", index=False)
    return root


def test_calibrate_softens_an_overconfident_head(overconfident: Path, tmp_path: Path) -> None:
    # plain heads (no slide-contrast ones): they separate these features with the confidence this test needs
    cfg = fast_config(overconfident, **{"optim.epochs": 8, "optim.lr": 1e-2, "model.dropout": 0.0,
                                        "optim.patience": 0, "calibrate": True, "model.slide_contrast": "off"})
    (result,) = run_training(cfg, tmp_path)
    meta = read_checkpoint_meta(tmp_path / "checkpoint_best")
    t, record = meta["temperature"], meta["calibration"]
    assert t > 2 and record["temperature"] == t  # softer: the head was overconfident
    before, after = record["val_before"], record["val_after"]
    assert after["nll"] < 0.5 * before["nll"] and after["ece"] < 0.75 * before["ece"]
    head, _ = load_head(tmp_path / "checkpoint_best")
    assert float(head.temperature) == pytest.approx(t)
    # validation predictions come from the calibrated head; the predicted classes are those of T = 1
    preds = pd.read_csv(tmp_path / "val_predictions.csv", dtype={"slide_id": str})
    with torch.no_grad():
        bags = [torch.from_numpy(read_h5(overconfident / "features" / f"{s}.h5").features) for s in preds["slide_id"]]
        logits = torch.cat([head(bag[None]).logits for bag in bags])
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), preds[["prob_0", "prob_1"]], atol=1e-6)
    assert (logits.argmax(1).numpy() == preds["pred"]).all()
    assert json.loads((tmp_path / "test_metrics.json").read_text())["temperature"] == t
    assert result.val_metrics["ece"] == pytest.approx(after["ece"], abs=1e-6)  # float32 vs float64 softmax
    # a finished run resumed again refits from T = 1 and gets the same temperature
    run_training(cfg, tmp_path, resume=True)
    assert read_checkpoint_meta(tmp_path / "checkpoint_best")["temperature"] == pytest.approx(t, rel=1e-6)
