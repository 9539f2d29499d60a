"""`slidemil evaluate`: metrics against hand-computed values, slides left out, patients, and temperature
scaling."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from slidemil.cli import build_parser, main
from slidemil.errors import LabelTableError
from slidemil.evaluation.calibration import (
    apply_temperature,
    calibration_before_after,
    fit_temperature,
    logits_from_probs,
    nll,
)
from slidemil.evaluation.metrics import compute_metrics
from slidemil.report.evaluate import evaluate_predictions, read_predictions

CLASSES = ["benign", "tumour"]
# Six slides, hand-scored: predictions 0 0 1 0 1 1 for labels 0 0 0 1 1 1 (one FP, one FN).
P_TUMOUR = [0.1, 0.45, 0.7, 0.35, 0.85, 0.9]
LABELS = [0, 0, 0, 1, 1, 1]
PATIENTS = ["pA", "pA", "pB", "pC", "pC", "pD"]


def write_tables(tmp_path, extra_pred=True, extra_label=True, failed=True, label_as="name"):
    rows = [{"slide_id": f"s{i + 1}", "status": "ok", "error": "", "pred_class": CLASSES[int(p > 0.5)],
             "pred_index": int(p > 0.5), "prob_benign": 1 - p, "prob_tumour": p} for i, p in enumerate(P_TUMOUR)]
    if extra_pred:
        rows.append({**rows[0], "slide_id": "s7"})  # scored, not in the label table
    if failed:
        rows.append({"slide_id": "s9", "status": "failed", "error": "SlideReadError: corrupt tile",
                     "pred_class": "", "pred_index": None, "prob_benign": None, "prob_tumour": None})
    preds = pd.DataFrame(rows)
    preds["m1:prob_benign"] = 0.5  # an ensemble member's column: not a class of its own
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    labels = pd.DataFrame({"slide_id": [f"s{i + 1}" for i in range(6)],
                           "label": [CLASSES[y] if label_as == "name" else y for y in LABELS],
                           "patient_id": PATIENTS})
    if extra_label:
        labels.loc[len(labels)] = {"slide_id": "s8", "label": labels["label"].iloc[3], "patient_id": "pE"}
    if failed:
        labels.loc[len(labels)] = {"slide_id": "s9", "label": labels["label"].iloc[0], "patient_id": "pF"}
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "predictions.csv", tmp_path / "labels.csv"


def values(result):
    return {k: v["value"] for k, v in result["metrics"].items()}


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values(tmp_path):
    preds, labels = write_tables(tmp_path)
    result = evaluate_predictions(preds, labels, tmp_path / "out", n_boot=200, plots=False)
    v = values(result)
    assert result["n"] == 6 and result["class_names"] == CLASSES
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    assert v["accuracy"] == pytest.approx(4 / 6)
    assert v["balanced_accuracy"] == pytest.approx(2 / 3)
    assert v["macro_f1"] == pytest.approx(2 / 3)
    assert v["precision_tumour"] == pytest.approx(2 / 3) and v["recall_benign"] == pytest.approx(2 / 3)
    assert v["auc"] == pytest.approx(7 / 9)  # positives beat 1 + 3 + 3 of the 9 negatives
    assert v["average_precision"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # Brier: sum over both classes of the squared error, i.e. 2 (p - y)^2, averaged
    assert v["brier"] == pytest.approx(2 * (0.01 + 0.2025 + 0.49 + 0.4225 + 0.0225 + 0.01) / 6)
    # ECE, 15 bins of the max probability: |1.8 - 2| + |.55 - 1| + .7 + .65 + |.85 - 1| over 6
    assert v["ece"] == pytest.approx(2.15 / 6)
    y, p = np.array(LABELS), np.array(P_TUMOUR)
    assert v["auc"] == pytest.approx(roc_auc_score(y, p))
    assert v["average_precision"] == pytest.approx(average_precision_score(y, p))
    for entry in result["metrics"].values():
        if entry["value"] is not None and entry["low"] is not None:
            assert entry["low"] - 1e-12 <= entry["value"] <= entry["high"] + 1e-12
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["metrics"] == result["metrics"] and "table" not in on_disk


def test_labels_as_indices_or_names_agree(tmp_path):
    results = []
    for label_as in ("name", "index"):
        folder = tmp_path / label_as
        folder.mkdir()
        results.append(evaluate_predictions(*write_tables(folder, label_as=label_as), folder / "out", n_boot=50,
                                            plots=False))
    assert results[0]["metrics"] == results[1]["metrics"]


def test_perfect_classifier_has_degenerate_intervals(tmp_path):
    ids = [f"s{i}" for i in range(12)]
    y = np.array([0] * 6 + [1] * 6)
    p = np.r_[np.linspace(0.05, 0.3, 6), np.linspace(0.7, 0.95, 6)]
    pd.DataFrame({"slide_id": ids, "prob_benign": 1 - p, "prob_tumour": p}).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"slide_id": ids, "label": y}).to_csv(tmp_path / "l.csv", index=False)
    m = evaluate_predictions(tmp_path / "p.csv", tmp_path / "l.csv", tmp_path / "out", n_boot=300)["metrics"]
    for key in ("auc", "accuracy", "balanced_accuracy", "average_precision", "macro_f1"):
        assert m[key] == {"value": 1.0, "low": 1.0, "high": 1.0}, key
    for name in ("roc", "pr", "confusion", "reliability"):
        assert (tmp_path / "out" / "plots" / f"{name}.png").stat().st_size > 1000


def test_missing_and_failed_slides_are_listed_not_dropped(tmp_path, caplog):
    preds, labels = write_tables(tmp_path)
    with caplog.at_level(logging.WARNING, logger="slidemil.report.evaluate"):
        result = evaluate_predictions(preds, labels, tmp_path / "out", n_boot=0, plots=False)
    assert result["missing"] == {"unlabelled": ["s7"], "unscored": ["s8"]}
    assert result["failed"] == [{"slide_id": "s9", "status": "failed", "error": "SlideReadError: corrupt tile"}]
    assert result["metrics"]["auc"]["low"] is None  # no bootstrap asked for
    text = caplog.text
    assert "s7" in text and "s8" in text and "s9" in text
    table = result["table"]
    assert "scored but not labelled (1): s7" in table and "labelled but not scored (1): s8" in table
    assert "failed: s9" in table and "auc" in table
    rows = pd.read_csv(tmp_path / "out" / "evaluated.csv")
    assert sorted(rows["slide_id"]) == [f"s{i}" for i in range(1, 7)]
    assert rows["correct"].sum() == 4


def test_patient_level_aggregation(tmp_path):
    preds, labels = write_tables(tmp_path)
    result = evaluate_predictions(preds, labels, tmp_path / "out", by="patient", n_boot=100, plots=False)
    # patients: pA mean .275 -> benign (right), pB .7 -> tumour (wrong), pC .6 and pD .9 -> tumour (right)
    assert result["by"] == "patient" and result["n"] == 4
    assert values(result)["accuracy"] == pytest.approx(3 / 4)
    assert result["confusion_matrix"] == [[1, 1], [0, 2]]
    rows = pd.read_csv(tmp_path / "out" / "evaluated.csv")
    assert sorted(rows["patient_id"]) == ["pA", "pB", "pC", "pD"]
    assert rows.set_index("patient_id").loc["pA", "n_slides"] == 2


def test_patient_with_mixed_labels_and_bad_labels_raise(tmp_path):
    preds, labels = write_tables(tmp_path)
    table = pd.read_csv(labels)
    table.loc[table.slide_id == "s2", "label"] = "tumour"  # pA now has a benign and a tumour slide
    table.to_csv(labels, index=False)
    with pytest.raises(LabelTableError, match="different labels"):
        evaluate_predictions(preds, labels, tmp_path / "out", by="patient", n_boot=0, plots=False)
    table.loc[0, "label"] = "lymphoma"
    table.to_csv(labels, index=False)
    with pytest.raises(LabelTableError, match="lymphoma"):
        evaluate_predictions(preds, labels, tmp_path / "out", n_boot=0, plots=False)


def test_trainer_predictions_and_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 8)
    probs = rng.dirichlet(np.ones(3), 24) * 0.4 + np.eye(3)[y] * 0.6
    frame = pd.DataFrame({"slide_id": [f"t{i}" for i in range(24)], "label": y, "pred": probs.argmax(1),
                          **{f"prob_{c}": probs[:, i] for i, c in enumerate("abc")}, "split": "test"})
    frame.to_csv(tmp_path / "test_predictions.csv", index=False)
    assert read_predictions(tmp_path / "test_predictions.csv")[1] == ["a", "b", "c"]
    result = evaluate_predictions(tmp_path / "test_predictions.csv", None, tmp_path / "out", n_boot=100)
    expected = compute_metrics(y, probs, ["a", "b", "c"])
    assert values(result)["auc"] == pytest.approx(expected["auc"])
    assert values(result)["auc_b"] == pytest.approx(roc_auc_score(y == 1, probs[:, 1]))
    assert result["metrics"]["auc_b"]["low"] is not None


def test_cli_evaluate_and_report(tmp_path, caplog):
    assert "evaluate" in build_parser().format_help()  # help strings format (no stray %)
    preds, labels = write_tables(tmp_path)
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", str(preds), "--labels", str(labels), "--out", str(tmp_path / "ev"),
                     "--bootstrap", "50", "--by", "patient", "--no-plots"]) == 0
    assert "balanced_accuracy" in caplog.text and "95% CI" in caplog.text
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["by"] == "patient"
    assert main(["report", str(tmp_path), "--labels", str(labels), "--out", str(tmp_path / "rep"),
                 "--bootstrap", "20"]) == 0  # predictions without heatmaps: a gallery without pictures
    assert (tmp_path / "rep" / "index.html").read_text().count("class='card ") == 8
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep2")]) == 2  # not a run


# --- temperature scaling -----------------------------------------------------------------------------
def calibrated_logits(n: int = 3000, c: int = 3, seed: int = 0):
    """Logits whose softmax is calibrated (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, c))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return z, y


def ece(probs, y):
    return compute_metrics(y, probs, [str(i) for i in range(probs.shape[1])])["ece"]


def test_temperature_scaling_fixes_overconfidence():
    z, y = calibrated_logits()
    over = 3.0 * z  # an overconfident model: logits three times too large
    t = fit_temperature(over, y)
    assert t == pytest.approx(3.0, rel=0.15)
    before, after = apply_temperature(over, 1.0), apply_temperature(over, t)
    assert ece(after, y) < 0.5 * ece(before, y)
    assert nll(over, y, t) < nll(over, y, 1.0)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.15)  # underconfident: T < 1


def test_temperature_accepts_tensors_and_probabilities():
    torch = pytest.importorskip("torch")
    z, y = calibrated_logits(n=500, c=2, seed=1)
    t_np = fit_temperature(2 * z, y)
    assert fit_temperature(torch.tensor(2 * z, dtype=torch.float32), torch.tensor(y)) == pytest.approx(t_np, rel=1e-3)
    p = apply_temperature(2 * z, 1.0)
    assert fit_temperature(logits_from_probs(p), y) == pytest.approx(t_np, rel=1e-3)  # log p works as logits
    np.testing.assert_allclose(apply_temperature(logits_from_probs(p), 1.0), p, atol=1e-12)
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, int))


def test_calibration_before_after_fitted_or_stored():
    z, y = calibrated_logits(n=2000, c=2, seed=2)
    over = apply_temperature(3 * z, 1.0)
    fitted = calibration_before_after(y[:1000], over[:1000], y[1000:], over[1000:], ["a", "b"])
    assert fitted["source"] == "fitted on 1000 validation slides"
    assert fitted["after"]["ece"] < fitted["before"]["ece"] and fitted["after"]["nll"] < fitted["before"]["nll"]
    calibrated = apply_temperature(3 * z, 3.0)  # a model that already carries T = 3
    stored = calibration_before_after(None, None, y, calibrated, ["a", "b"], stored_temperature=3.0)
    assert stored["source"] == "stored in the checkpoint"
    assert stored["before"]["nll"] == pytest.approx(nll(3 * z, y), rel=1e-6)
    assert stored["after"]["nll"] == pytest.approx(nll(3 * z, y, 3.0), rel=1e-6)
