"""`slidemil quantize`: an int8 OpenVINO backbone, calibrated on slides, checked, and scored with."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

pytest.importorskip("openvino", reason="openvino is not installed")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'slidemil[quantize]')")

from slidemil.artifacts.package import load_package, write_manifest  # noqa: E402
from slidemil.cli import main  # noqa: E402
from slidemil.engine.score import ScoreConfig, score_slides  # noqa: E402
from slidemil.errors import ConfigError, ExportError, PackageError  # noqa: E402
from slidemil.exporter import quantize  # noqa: E402
from slidemil.exporter.parity import ParityConfig  # noqa: E402
from slidemil.exporter.quantize import PlannedSlide, QuantizeConfig, quantize_package  # noqa: E402
from slidemil.slide.table import SlideEntry  # noqa: E402
from tests.engine_fixtures import make_package_and_slides  # noqa: E402

SMALL = QuantizeConfig(calibration_tiles=48, parity=ParityConfig(n_tiles=32, batch_sizes=(1, 7, 16), n_slide_bags=8))


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
    calibration, held_out = section["calibration"]["slides"], section["held_out_slides"]
    assert section["backbone"] == "backbone_int8.xml" and len(held_out) == 1 and len(calibration) == 1
    assert sorted(calibration + held_out) == ["test", "train"]  # whole slides: calibrated on one, checked on the other
    assert section["calibration"]["tiles"] == 48
    parity = section["parity"]
    assert parity["passed"] and parity["identical_classes"] and parity["tolerance"] == 1e-2
    assert parity["probabilities"]["max_abs"] <= 1e-2
    (slide,) = parity["slides"]
    assert slide["slide_id"] == held_out[0] and slide["passed"] and slide["identical_class"]
    assert slide["n_tiles"] == slide["tissue_tiles"] > 32  # the whole slide's bag, below --parity-max-tiles
    assert slide["probabilities"] == parity["probabilities"] and slide["classes"]["reference"] == "tumour"
    assert slide["classes"]["int8"] == slide["classes"]["reference"]
    info = parity["information"]  # tile-level figures are kept, as information
    assert "not gating" in info["note"] and info["features"]["min_cosine"] >= 0.99
    assert info["one_tile_bags"]["n_bags"] == slide["n_tiles"] and info["sub_bags"]["n_bags"] == 8
    assert {"backbone_int8.xml", "backbone_int8.bin"} <= set(quantized.manifest.files)


def test_the_quantizers_library_versions_go_into_the_manifest(quantized):
    versions = {name: metadata.version(name) for name in ("nncf", "openvino")}
    assert {k: quantized.manifest.library_versions[k] for k in versions} == versions
    assert quantized.manifest.openvino["int8"]["library_versions"] == versions
    assert {"torch", "onnxruntime"} <= set(quantized.manifest.library_versions)  # the export's stay


def _planned(n: int) -> list[PlannedSlide]:
    return [PlannedSlide(SlideEntry(f"s{i:02d}", Path(f"s{i:02d}.svs")), np.zeros((1, 2), np.int64), 512)
            for i in range(n)]


@pytest.mark.parametrize(("n", "held"), [(2, 1), (3, 1), (8, 2), (12, 3), (40, 4)])
def test_held_out_slides_are_a_seeded_quarter_disjoint_from_calibration(n, held):
    planned = _planned(n)
    calibration, held_out = quantize.split_slides(planned, QuantizeConfig())
    ids = [s.slide_id for s in calibration], [s.slide_id for s in held_out]
    assert len(ids[1]) == held and not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == sorted(
        s.slide_id for s in planned)
    again = quantize.split_slides(planned, QuantizeConfig())
    assert [s.slide_id for s in again[1]] == ids[1]  # seeded
    assert len(quantize.split_slides(planned, QuantizeConfig(parity_slides=1))[1]) == 1


def test_one_slide_is_refused_with_nothing_written(packaged, tmp_path):
    model_dir, slides, _, _ = packaged  # slides/ holds one slide
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    before = _bytes(dst)
    with pytest.raises(ConfigError, match="at least 2 slides"):
        quantize_package(dst, slides, SMALL)
    assert _bytes(dst) == before


def test_large_held_out_slides_are_checked_on_a_seeded_uniform_sample():
    slide = _planned(1)[0]
    slide = replace(slide, coords=np.zeros((5000, 2), np.int64))
    pick = quantize.slide_tiles(slide, 2000, seed=0)
    assert len(pick) == 2000 == len(np.unique(pick)) and np.array_equal(pick, quantize.slide_tiles(slide, 2000, 0))
    assert pick.min() < 100 and pick.max() > 4900  # spread over the whole slide
    assert np.array_equal(quantize.slide_tiles(slide, 6000, 0), np.arange(5000))


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    report = tmp_path / "verify.json"
    assert main(["verify", str(dst), "--backend", "openvino", "--precision", "int8", "--json", str(report)]) == 0
    parity = json.loads(report.read_text())["parity"]
    assert parity["gate"] == "whole_bag" and parity["passed"] and parity["whole_bag"]["identical_class"]
    assert parity["whole_bag"]["probabilities"]["max_abs"] <= 1e-2 and "sub_bags" in parity["information"]["figures"]
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
    monkeypatch.setattr(quantize, "tolerance_for", lambda precision: -1.0)  # nothing can pass
    with pytest.raises(ExportError, match="misses its tolerance"):
        quantize_package(dst, calibration, SMALL)
    assert (dst / "manifest.json").read_text() == before
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert json.loads(before).get("openvino") is None


def test_a_failed_requantization_leaves_every_byte_of_the_package(packaged, quantized, tmp_path, monkeypatch):
    _, _, _, calibration = packaged
    dst = tmp_path / "model"
    shutil.copytree(quantized.root, dst)
    before = _bytes(dst)
    monkeypatch.setattr(quantize, "tolerance_for", lambda precision: -1.0)  # nothing can pass
    with pytest.raises(ExportError, match="misses its tolerance"):
        quantize_package(dst, calibration, SMALL)
    assert _bytes(dst) == before  # the earlier int8 backbone and manifest, and no temporaries left
    assert load_package(dst).openvino_int8() == dst / "backbone_int8.xml"


def test_calibration_tiles_a_mask_tissue_package_by_colour(packaged, tmp_path):
    model_dir, _, _, calibration = packaged
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    (tmp_path / "masks").mkdir()  # the training slides' masks; none for these slides
    pkg = load_package(dst)
    tissue = replace(pkg.manifest.tissue, method="mask", mask_dir=str(tmp_path / "masks"))
    write_manifest(dst, replace(pkg.manifest, tissue=tissue))
    masked = quantize.plan_slides(load_package(dst), calibration)
    by_colour = quantize.plan_slides(pkg, calibration)
    assert [s.slide_id for s in masked] == ["test", "train"]
    assert all(np.array_equal(a.coords, b.coords) for a, b in zip(masked, by_colour))


def _head_logit_gaps(pkg, features: np.ndarray) -> tuple[float, np.ndarray]:
    """logit(tumour) - logit(normal) of the whole bag and of each one-tile bag (ONNX Runtime fp32 head)."""
    from slidemil.runtime.runners import OnnxRuntimeRunner
    with OnnxRuntimeRunner(pkg.head_onnx) as head:
        def gap(bag: np.ndarray) -> float:
            logits = head.infer({"features": np.ascontiguousarray(bag, np.float32)})["logits"]
            return float(logits[1] - logits[0])
        return gap(features), np.array([gap(features[i:i + 1]) for i in range(len(features))])


def _sharpen_head(root, scale: float, boundary: float) -> None:
    """Make the package's head over-confident: logit gap -> scale * (gap - boundary), in head.onnx and
    the torch weights alike, and rewrite the manifest's checksums."""
    import torch
    from safetensors.torch import save_file

    from slidemil.artifacts.package import HEAD_WEIGHTS_FILE, load_torch_models
    from slidemil.models.onnx import export_head

    pkg = load_package(root)
    _, bag_head = load_torch_models(pkg)
    head = bag_head.head
    with torch.no_grad():
        head.classifier.weight.mul_(scale)
        head.classifier.bias.mul_(scale)
        head.classifier.bias[1] -= scale * boundary * float(head.temperature)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(pkg.torch_dir / HEAD_WEIGHTS_FILE))
    export_head(bag_head, pkg.head_onnx, pkg.card.feature_dim, exporter="legacy")
    write_manifest(root, pkg.manifest)


def _held_out_features(pkg, calibration) -> np.ndarray:
    """ONNX Runtime fp32 features of the held-out slide's bag, as quantize computes them."""
    from slidemil.exporter.parity import run_backbone
    from slidemil.runtime.runners import OnnxRuntimeRunner
    from slidemil.slide.readers import open_slide

    _, (slide,) = quantize.split_slides(quantize.plan_slides(pkg, calibration), SMALL)
    coords = slide.coords[quantize.slide_tiles(slide, SMALL.parity_max_tiles, SMALL.seed)]
    with open_slide(slide.entry.path) as reader:
        tiles = reader.read_tiles(coords, slide.size_level0, pkg.tile_px)
    with OnnxRuntimeRunner(pkg.backbone_onnx) as backbone:
        return run_backbone(backbone, tiles, SMALL.batch_size)


def test_the_gate_is_whole_slide_bags_not_one_tile_bags(packaged, tmp_path, monkeypatch):
    """An over-confident head whose boundary passes through one tile: that one-tile bag's probability
    swings with int8's feature error, the whole slide's does not; int8 is kept, the swing recorded."""
    model_dir, _, _, calibration = packaged
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    pkg = load_package(dst)
    whole, tiles = _head_logit_gaps(pkg, _held_out_features(pkg, calibration))
    k = int(np.argmax(np.abs(tiles - whole)))  # the tile farthest from the slide: the slide keeps a wide margin
    _sharpen_head(dst, scale=400 / abs(tiles[k] - whole), boundary=tiles[k])
    seen, real = [], quantize.calibration_tiles

    def spy(pkg, slides, *args):
        seen.append([s.slide_id for s in slides])
        return real(pkg, slides, *args)

    monkeypatch.setattr(quantize, "calibration_tiles", spy)
    got = quantize_package(dst, calibration, SMALL)
    parity = got.manifest.openvino["int8"]["parity"]
    assert seen == [got.manifest.openvino["int8"]["calibration"]["slides"]]  # tiles of the calibration slides only
    assert not set(seen[0]) & {s["slide_id"] for s in parity["slides"]}
    assert parity["passed"] and parity["probabilities"]["max_abs"] <= 1e-2 and parity["identical_classes"]
    assert parity["information"]["one_tile_bags"]["probabilities"]["max_abs"] > 1e-2  # recorded, not gating
    assert got.openvino_int8() == dst / "backbone_int8.xml"


def test_a_whole_slide_miss_is_refused_with_nothing_written(packaged, tmp_path):
    """The same over-confident head with its boundary through the held-out slide's own bag: a real miss."""
    model_dir, _, _, calibration = packaged
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    pkg = load_package(dst)
    whole, tiles = _head_logit_gaps(pkg, _held_out_features(pkg, calibration))
    _sharpen_head(dst, scale=1e4 / np.abs(tiles - whole).max(), boundary=whole)
    before = _bytes(dst)
    with pytest.raises(ExportError, match="misses its tolerance on whole held-out slides"):
        quantize_package(dst, calibration, SMALL)
    assert _bytes(dst) == before and load_package(dst).manifest.openvino is None
