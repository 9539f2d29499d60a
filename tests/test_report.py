"""Plots, the HTML report of scoring outputs and training runs, and the page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pandas as pd
import pytest

from slidemil.engine.outputs import PredictionsTable, geojson_tiles, write_geojson, write_heatmap, write_topk
from slidemil.errors import ConfigError
from slidemil.evaluation.stats import calibration_curve
from slidemil.report import plots as P
from slidemil.report.report import build_report, detect_kind
from slidemil.slide.grid import grid_from_coords
from slidemil.slide.readers import open_slide

CLASSES = ["normal", "tumor"]


def check_png(path: Path) -> None:
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 50 and img.shape[1] > 50, f"{path} is not a PNG image"
    assert img.std() > 1.0, f"{path} is blank"


def check_svg(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(list(root.iter())) > 20, f"{path} holds almost nothing"


# --- fixtures ----------------------------------------------------------------------------------------
def score_slide(out: Path, cohort: Path, row: pd.Series, lesions: list[dict], prob_tumor: float) -> None:
    """Heatmap, GeoJSON and top-k of one real synthetic slide, attention high near its lesions."""
    with open_slide(cohort / row.path) as reader:
        width, height = reader.dimensions
        xs, ys = np.meshgrid(np.arange(0, width - 255, 256), np.arange(0, height - 255, 256))
        coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
        grid = grid_from_coords(coords, 256, 256, (width, height), reader.mpp)
        centres = coords + 128
        if lesions:
            d = np.min([np.hypot(*(centres - [les["x"], les["y"]]).T) for les in lesions], axis=0)
        else:
            d = np.hypot(*(centres - [width / 2, height / 2]).T) * 3
        attention = 1.0 / (1.0 + d / 256.0)
        thumb, _ = reader.thumbnail(max_size=384)
        pred = CLASSES[int(prob_tumor >= 0.5)]
        title = f"{row.slide_id}: {pred} {max(prob_tumor, 1 - prob_tumor):.2f}"
        write_heatmap(out, row.slide_id, grid, attention / attention.max(), "minmax", thumb, title)
        probs = np.array([1 - prob_tumor, prob_tumor])
        write_geojson(out / "geojson" / f"{row.slide_id}.geojson",
                      geojson_tiles(grid, attention, "minmax", CLASSES, probs))
        top = np.argsort(-attention)[:4]
        write_topk(out, row.slide_id, reader.read_tiles(coords[top], 256, 64), coords[top], attention[top])


@pytest.fixture(scope="module")
def scored_cohort(synth_cohort, tmp_path_factory):
    """A `slidemil score`-like folder for the 4 synthetic slides, one of them misclassified, plus a failed
    slide; the label table lists an extra slide that was never scored."""
    cohort, table = synth_cohort
    truth = {s["slide_id"]: s["lesions"] for s in json.loads((cohort / "truth.json").read_text())["slides"]}
    out = tmp_path_factory.mktemp("scored")
    preds = PredictionsTable(out, CLASSES)
    for i, row in enumerate(table.itertuples()):
        p = [0.1, 0.35, 0.8, 0.9][i] if row.label == 1 else [0.2, 0.65, 0.05, 0.3][i]
        score_slide(out, cohort, pd.Series(row._asdict()), truth[row.slide_id], p)
        preds.append({"slide_id": row.slide_id, "status": "ok", "pred_class": CLASSES[int(p >= 0.5)],
                      "pred_index": int(p >= 0.5), "prob_normal": 1 - p, "prob_tumor": p, "n_tiles": 56,
                      "seconds": 0.5, "tiles_per_s": 112.0})
    preds.append({"slide_id": "broken_slide", "status": "failed", "error": "SlideOpenError: not a slide"})
    (out / "score_config.json").write_text(json.dumps({"package": "model.slidemil", "backend": "onnxruntime"}))
    labels = table[["slide_id", "label", "patient_id"]].copy()
    labels["label"] = [CLASSES[v] for v in labels["label"]]
    labels.loc[len(labels)] = {"slide_id": "never_scored", "label": "tumor", "patient_id": "patient_9"}
    labels.to_csv(out / "labels.csv", index=False)
    return out, table


@pytest.fixture(scope="module")
def score_report(scored_cohort, tmp_path_factory):
    out, _ = scored_cohort
    report_dir = tmp_path_factory.mktemp("report") / "report"
    index = build_report(out, report_dir, labels_csv=out / "labels.csv", n_boot=200)
    return index, scored_cohort


def make_training_run(folder: Path, n_epochs: int = 6, seed: int = 0, n_test: int = 30) -> None:
    """The files a training run leaves (metrics.csv, checkpoint_best.json, val/test predictions)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    e = np.arange(1, n_epochs + 1)
    wiggle = rng.normal(0, 0.03, n_epochs)
    pd.DataFrame({"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.6 / e + 0.05 * (e > 4) + wiggle,
                  "val_auc": 1 - 0.4 / e - wiggle, "val_balanced_accuracy": 1 - 0.35 / e - wiggle, "lr": 1e-4,
                  "seconds": 1.0}).to_csv(folder / "metrics.csv", index=False)
    (folder / "checkpoint_best.json").write_text(json.dumps({"epoch": 4, "class_names": CLASSES}))
    (folder / "train_config.json").write_text(json.dumps({"seed": seed, "optim": {"epochs": n_epochs}}))
    for part, n in (("val", 40), ("test", n_test)):
        z = rng.normal(0, 2.0, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)  # labels drawn from sigmoid(z): z is calibrated
        p = 1 / (1 + np.exp(-3.0 * z))  # the model reports 3 z: overconfident
        pd.DataFrame({"slide_id": [f"{part}{seed}_{i}" for i in range(n)], "label": y, "pred": (p > 0.5).astype(int),
                      "prob_normal": 1 - p, "prob_tumor": p, "split": part}).to_csv(
            folder / f"{part}_predictions.csv", index=False)


def test_plots_written_and_non_empty(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), 30) * 0.5 + np.eye(3)[y] * 0.5
    names = ["a", "b", "c"]
    metrics = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.6, 0.4], "val_loss": [0.9, 0.7, 0.8],
                            "val_auc": [0.6, 0.8, 0.75], "val_balanced_accuracy": [0.5, 0.7, 0.65]})
    roc = P.plot_roc(y, probs, names)
    legend = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert len(legend) == 4 and all("AUC" in t for t in legend[:3])  # a, b, c and chance
    curves = P.plot_training_curves(metrics, best_epoch=2)
    assert "kept epoch (2)" in [t.get_text() for t in curves.axes[0].get_legend().get_texts()]
    assert len(curves.axes) == 3  # loss, AUC, balanced accuracy
    # the report tests save every plot; here the multiclass ones
    for name, fig in {"roc": roc, "confusion": P.plot_confusion([[8, 1, 1], [0, 9, 1], [2, 0, 8]], names),
                      "reliability": P.plot_reliability({"before": calibration_curve(y, probs)})}.items():
        png, svg = P.save_figure(fig, tmp_path / name)
        check_png(png)
        check_svg(svg)


# --- report ---------------------------------------------------------------------------------------
def test_detect_kind(tmp_path, scored_cohort):
    make_training_run(tmp_path / "run")
    assert detect_kind(tmp_path / "run") == "train"
    assert detect_kind(scored_cohort[0]) == "score"
    with pytest.raises(ConfigError, match="not a training run"):
        detect_kind(tmp_path)


def test_score_report_page(score_report):
    index, (scored, table) = score_report
    text = index.read_text()
    report = index.parent
    assert text.count("class='card ") == len(table) + 1  # every slide, the failed one too
    assert "never_scored" in text and "broken_slide" in text and "SlideOpenError: not a slide" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    for sid in table["slide_id"]:
        thumb = report / "thumbs" / f"{sid}.jpg"
        assert max(cv2.imread(str(thumb)).shape[:2]) <= 256
        for link in (f"../../{scored.name}/heatmaps/{sid}.png", f"../../{scored.name}/topk/{sid}/",
                     f"../../{scored.name}/geojson/{sid}.geojson"):
            assert f"href='{link}'" in text
            assert (report / link).exists()
    assert text.count("loading='lazy'") >= len(table)
    for target in re.findall(r"(?:src|href)='([^'#]+)'", text):  # every relative link resolves
        assert (report / unquote(target)).exists(), target
    for name in ("roc", "pr", "confusion", "reliability"):
        check_png(report / "plots" / f"{name}.png")
        check_svg(report / "plots" / f"{name}.svg")
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["missing"]["unscored"] == ["never_scored"]
    assert [f["slide_id"] for f in metrics["failed"]] == ["broken_slide"]
    assert (report / "metrics_patient.json").is_file()  # two slides per patient


def test_training_run_report(tmp_path):
    make_training_run(tmp_path / "run")
    index = build_report(tmp_path / "run", tmp_path / "report", n_boot=100)
    text = index.read_text()
    assert text.count("class='card ") == 30
    assert "Calibration" in text and "fitted on 40 validation slides" in text
    cal = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert cal["temperature"] > 1.0 and cal["after"]["nll"] < cal["before"]["nll"]
    for name in ("training_curves", "roc", "pr", "confusion", "reliability"):
        check_png(tmp_path / "report" / "plots" / f"{name}.png")


def test_cv_report(tmp_path):
    root = tmp_path / "cv"
    for i in range(3):
        make_training_run(root / f"fold_{i}", seed=i, n_test=10)
    pd.DataFrame({"metric": ["auc", "accuracy"], "mean": [0.8, 0.7], "std": [0.05, 0.1], "n_folds": [3, 3],
                  "fold_0": [0.8, 0.7], "fold_1": [0.75, 0.6], "fold_2": [0.85, 0.8]}).to_csv(
        root / "cv_summary.csv", index=False)
    assert detect_kind(root) == "cv"
    text = build_report(root, tmp_path / "report", n_boot=100).read_text()
    assert text.count("class='card ") == 30 and "fold 2" in text and "mean &plusmn; std" in text
    for name in ("cv_curves", "cv_roc"):
        check_png(tmp_path / "report" / "plots" / f"{name}.png")


# --- headless browser ---------------------------------------------------------------------------------
def run_chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe is not None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or (":CONSOLE" in line and ("ERROR" in line or "error" in line.lower()))
            or "Failed to load resource" in line or "net::ERR_" in line]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium is not installed (Debian: apt-get install chromium; CI runs .ci/install-chromium.sh)")
def test_report_renders_in_headless_chromium(score_report, tmp_path):
    index, (_, table) = score_report
    url = index.resolve().as_uri()
    dom = run_chromium(tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    assert not re.search(r"<html[^>]*data-js-error", dom.stdout), "a script raised an error"
    n = len(table) + 1
    assert f'data-gallery-cards="{n}"' in dom.stdout and f'data-gallery-shown="{n}"' in dom.stdout
    assert f"{n} of {n} slides shown" in dom.stdout
    assert len(re.findall(r'<div class="card ', dom.stdout)) == n

    wrong = run_chromium(tmp_path, url + "#correct=wrong&sort=prob-asc", "--dump-dom")
    assert not console_errors(wrong.stderr)
    assert 'data-gallery-shown="1"' in wrong.stdout  # the one misclassified slide

    shot = tmp_path / "report.png"
    result = run_chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2000",
                          "--hide-scrollbars")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    check_png(shot)
