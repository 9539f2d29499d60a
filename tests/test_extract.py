"""Feature extraction through the engine's tile pipeline."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.artifacts.tiling_record import load_tiling
from slidemil.cli import main
from slidemil.features.extract import ExtractConfig, extract_features
from slidemil.models.backbones import create_backbone, load_backbone
from slidemil.models.preprocess import UInt8Backbone
from slidemil.runtime.pipeline import PipelineConfig, TilePipeline
from slidemil.slide.readers import open_slide
from slidemil.slide.store import read_h5
from slidemil.slide.table import SlideEntry
from slidemil.slide.tiling import TilingConfig
from slidemil.tile import tile_slides


@pytest.fixture(scope="module")
def tiled(synth_cohort, tmp_path_factory):
    cohort, table = synth_cohort
    out = tmp_path_factory.mktemp("tiles")
    tile_slides(cohort / "slides", out)
    return cohort, table, out


def test_pipeline_yields_every_tile_in_order(synth_slide):
    path, _ = synth_slide
    entry = SlideEntry("pos", path)
    cfg = PipelineConfig(batch_size=7, workers=2, queue_batches=2)
    errors = []
    with TilePipeline(cfg, TilingConfig()) as pipeline:
        for stream in pipeline.run([entry, SlideEntry("missing", path.parent / "nope.svs"), entry]):
            errors.append(stream.error)
            stream.drain()
    assert [e is None for e in errors] == [True, False, True] and "nope.svs" in str(errors[1])
    with TilePipeline(cfg, TilingConfig()) as pipeline:
        for stream in pipeline.run([entry]):
            firsts, tiles = zip(*stream.batches())
            coords = stream.plan.grid.coords
    assert list(firsts) == list(range(0, len(coords), 7))
    all_tiles = np.concatenate(tiles)
    assert len(all_tiles) == len(coords)
    with open_slide(path) as r:
        expect = r.read_tiles(coords[[0, -1]], stream.plan.grid.patch_size_level0, 256)
    np.testing.assert_array_equal(all_tiles[[0, -1]], expect)


def test_pipeline_consumer_can_abandon_a_slide(synth_slide):
    path, _ = synth_slide
    entries = [SlideEntry(f"s{i}", path) for i in range(3)]
    with TilePipeline(PipelineConfig(batch_size=4, workers=2, queue_batches=2), TilingConfig()) as pipeline:
        done = []
        for stream in pipeline.run(entries):
            next(iter(stream.batches()))
            stream.drain()  # e.g. after a model error: the next slide must still come
            done.append(stream.entry.slide_id)
    assert done == ["s0", "s1", "s2"]


def test_extraction_writes_the_contract(tiled, tmp_path):
    cohort, table, coords_dir = tiled
    torch.manual_seed(0)
    # torch fp32: its features must equal the backbone's on each tile alone (checked at the end)
    cfg = ExtractConfig(backbone="test_resnet", device="cpu", backend="torch", reading=PipelineConfig(batch_size=16))
    log = extract_features(cohort / "slides", tmp_path, cfg, coords_dir=coords_dir)
    rows = pd.DataFrame(log.rows.values())
    assert (rows.status == "ok").all() and len(rows) == len(table)
    for slide_id in table.slide_id:
        feats = read_h5(tmp_path / "features" / f"{slide_id}.h5")
        coords = read_h5(coords_dir / "coords" / f"{slide_id}.h5")
        np.testing.assert_array_equal(feats.coords, coords.coords)
        assert feats.features.shape == (len(coords.coords), 96) and np.isfinite(feats.features).all()
        assert feats.encoder == "test_resnet" and feats.attrs == coords.attrs
    assert main(["check", str(tmp_path / "features")]) == 0  # the h5 contract of docs/formats.md
    # the backbone travels with the features: random weights are saved and their hash recorded
    model, card = load_backbone(tmp_path / "backbone")
    assert card.name == "test_resnet" and card.weights_source == "random"
    assert load_tiling(tmp_path).tile.patch_size == 256
    # features equal the backbone run on each tile alone (batching changes nothing)
    slide_id = table.slide_id[0]
    bag = read_h5(tmp_path / "features" / f"{slide_id}.h5")
    with open_slide(cohort / "slides" / f"{slide_id}.svs") as r:
        tiles = r.read_tiles(bag.coords[:3], bag.attrs.patch_size_level0, 256)
    with torch.inference_mode():
        alone = np.stack([UInt8Backbone(model, card)(torch.from_numpy(t[None]))[0].numpy() for t in tiles])
    np.testing.assert_allclose(alone, bag.features[:3], rtol=1e-4, atol=1e-5)


def test_clam_style_loader_reads_our_files(tiled, tmp_path):
    cohort, table, coords_dir = tiled
    extract_features(cohort / "slides", tmp_path, ExtractConfig(backbone="test_resnet", device="cpu"),
                     coords_dir=coords_dir)
    path = tmp_path / "features" / f"{table.slide_id[1]}.h5"
    with h5py.File(path, "r") as f:  # CLAM's Generic_MIL_Dataset / TRIDENT's loaders do exactly this
        features = torch.from_numpy(f["features"][:])
        coords = f["coords"][:]
        patch_level, patch_size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
    assert features.ndim == 2 and coords.shape == (len(features), 2) and patch_level == 0 and patch_size == 256


def test_extract_cli_resumes_and_records_bad_slides(tmp_path, synth_cohort, real_data):
    cohort, table = synth_cohort
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    shutil.copy(real_data / "unreadable.svs", slides)
    out = tmp_path / "feat"
    args = ["extract", str(slides), "--tile", "--out", str(out), "--backbone", "test_resnet", "--device", "cpu",
            "--limit-tiles", "20", "--batch-size", "8"]
    torch.manual_seed(0)
    assert main(args) == 0
    log = pd.read_csv(out / "extraction.csv").set_index("slide_id")
    assert log.loc["unreadable", "status"] == "error" and "unreadable.svs" in log.loc["unreadable", "error"]
    tiled_counts = pd.read_csv(out / "extraction.csv").set_index("slide_id").drop("unreadable").n_tiles
    assert ((tiled_counts > 0) & (tiled_counts <= 20)).all()
    first = out / "features" / f"{table.slide_id[0]}.h5"
    stamp = first.stat().st_mtime_ns
    torch.manual_seed(0)
    assert main(args) == 0  # a re-run skips the slides that are done
    assert first.stat().st_mtime_ns == stamp
    config = json.loads((out / "extract_config.json").read_text())
    assert config["config"]["backbone"] == "test_resnet"


def test_extract_refuses_a_different_backbone_in_the_same_folder(tiled, tmp_path):
    cohort, _, coords_dir = tiled
    torch.manual_seed(0)
    extract_features(cohort / "slides", tmp_path, ExtractConfig(backbone="test_resnet", device="cpu",
                                                                 reading=PipelineConfig(max_tiles=4)),
                     coords_dir=coords_dir)
    from slidemil.errors import ConfigError
    with pytest.raises(ConfigError, match="already holds features"):  # other random weights: another backbone
        extract_features(cohort / "slides", tmp_path, ExtractConfig(backbone="test_resnet", device="cpu", seed=1),
                         coords_dir=coords_dir)


def test_extraction_with_onnx_backends_matches_torch(tiled, tmp_path):
    cohort, table, coords_dir = tiled
    results = {}
    for backend in ("torch", "onnxruntime"):
        torch.manual_seed(0)
        out = tmp_path / backend
        extract_features(cohort / "slides", out, ExtractConfig(backbone="test_resnet", device="cpu", backend=backend,
                                                               reading=PipelineConfig(max_tiles=16)),
                         coords_dir=coords_dir)
        results[backend] = read_h5(out / "features" / f"{table.slide_id[0]}.h5")
    np.testing.assert_allclose(results["onnxruntime"].features, results["torch"].features, rtol=1e-4, atol=1e-4)
    assert results["onnxruntime"].feature_attrs["backend"].startswith("onnxruntime")


def test_random_weights_round_trip_through_a_weights_file(tmp_path):
    torch.manual_seed(0)
    model, card = create_backbone("test_resnet")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    again, card2 = create_backbone("test_resnet", tmp_path / "w.pth")
    assert card2.weights_sha256 == card.weights_sha256
