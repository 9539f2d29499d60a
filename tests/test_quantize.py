"""`slidemil quantize`: an int8 OpenVINO backbone, calibrated on slides, checked, and scored with."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

pytest.importorskip("openvino", reason="openvino is not installed")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'slidemil[quantize]')")

from slidemil.cli import main  # noqa: E402
from slidemil.engine.score import ScoreConfig, score_slides  # noqa: E402
from slidemil.errors import ExportError, PackageError  # noqa: E402
from slidemil.exporter import quantize  # noqa: E402
from slidemil.exporter.package import load_package  # noqa: E402
from slidemil.exporter.quantize import QuantizeConfig, quantize_package  # noqa: E402
from tests.engine_fixtures import make_package_and_slides  # noqa: E402

SMALL = QuantizeConfig(calibration_tiles=96, parity_tiles=32)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A trained package that finds the lesion, and its fp32 (ONNX Runtime) scores."""
    root = tmp_path_factory.mktemp("quantize")
    model_dir, slides, _ = make_package_and_slides(root)
    fp32 = root / "fp32"
    score_slides([model_dir], slides, fp32, ScoreConfig(backend="onnxruntime", device="cpu", top_k=0, geojson=False))
    calibration = root / "calibration"  # slides like those scored: the training slide and the scored one
    calibration.mkdir()
    for name in ("train.svs", "test.svs"):
        shutil.copy(root / name, calibration / name)
    return model_dir, slides, fp32, calibration


@pytest.fixture(scope="module")
def quantized(packaged, tmp_path_factory):
    model_dir, _, _, calibration = packaged
    dst = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(model_dir, dst)
    return quantize_package(dst, calibration, SMALL)


def test_quantized_package_records_calibration_parity_and_checksums(quantized):
    section = quantized.manifest.openvino["int8"]
    assert section["backbone"] == "backbone_int8.xml" and section["calibration"]["slides"] == ["test", "train"]
    assert section["calibration"]["tiles"] == 96 and section["parity"]["passed"]
    assert section["parity"]["probabilities"]["max_abs"] <= 1e-2 and section["parity"]["argmax_agreement"] == 1.0
    assert section["parity"]["features"]["min_cosine"] >= 0.99
    assert {"backbone_int8.xml", "backbone_int8.bin"} <= set(quantized.manifest.files)
    assert "nncf" in quantized.manifest.library_versions


def test_auto_scores_with_int8_like_fp32(packaged, quantized, tmp_path):
    _, slides, fp32, _ = packaged
    out = tmp_path / "int8"
    summary = score_slides([quantized.root], slides, out, ScoreConfig(device="cpu", top_k=0, geojson=False))
    assert summary["backend"][0].startswith("openvino (CPU, int8")
    ref, got = (pd.read_csv(d / "predictions.csv").iloc[0] for d in (fp32, out))
    assert abs(got.prob_tumour - ref.prob_tumour) <= 1e-2 and got.pred_class == ref.pred_class == "tumour"
    a, b = (np.load(d / "heatmaps" / "lesion.npy") for d in (fp32, out))
    on = np.isfinite(a)
    assert np.array_equal(on, np.isfinite(b)) and spearmanr(a[on], b[on]).statistic >= 0.95


def test_verify_int8_and_refuse_tampered_weights(quantized, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(quantized.root, dst)
    assert main(["verify", str(dst), "--backend", "openvino", "--precision", "int8"]) == 0
    weights = dst / "backbone_int8.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="backbone_int8.bin"):
        load_package(dst)


def test_int8_without_a_quantized_backbone_says_how_to_make_one(packaged, tmp_path):
    model_dir, slides, _, _ = packaged
    with pytest.raises(PackageError, match="slidemil quantize"):
        score_slides([model_dir], slides, tmp_path, ScoreConfig(backend="openvino", precision="int8", device="cpu"))


def test_quantize_writes_nothing_when_int8_misses_its_tolerance(packaged, tmp_path, monkeypatch):
    model_dir, _, _, calibration = packaged
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    before = (dst / "manifest.json").read_text()
    monkeypatch.setattr(quantize, "tolerance_for", lambda precision: 0.0)  # nothing can pass
    with pytest.raises(ExportError, match="misses its tolerance"):
        quantize_package(dst, calibration, SMALL)
    assert (dst / "manifest.json").read_text() == before
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert json.loads(before).get("openvino") is None
