"""`slidemil demo --quick`: the whole pipeline, end to end, learns the synthetic task."""

from __future__ import annotations

import json

import pandas as pd

from slidemil.cli import main


def test_quick_demo_learns_and_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    figures = json.loads((out / "demo_summary.json").read_text())
    assert figures["test_auc"] >= 0.9 and figures["val_auc"] >= 0.9
    predictions = pd.read_csv(out / "scores" / "predictions.csv")
    assert (predictions.status == "ok").all() and len(predictions) >= 2
    assert set(predictions.pred_class) <= {"normal", "tumour"}
    for slide_id in predictions.slide_id:
        assert (out / "scores" / "heatmaps" / f"{slide_id}.png").is_file()
    assert "test AUC" in capsys.readouterr().out
    # a second run resumes every step and gives the same predictions
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = pd.read_csv(out / "scores" / "predictions.csv")
    pd.testing.assert_frame_equal(predictions.drop(columns=["seconds", "tiles_per_s"]),
                                  again.drop(columns=["seconds", "tiles_per_s"]))
