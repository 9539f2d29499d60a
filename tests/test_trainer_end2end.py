"""End-to-end training: a tiny backbone and the head learn a synthetic cohort from its tiles; frozen
parts stay put; the checkpoint carries the fine-tuned backbone to export and extraction; 2 gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from slidemil.artifacts.checkpoint import load_checkpoint_backbone, load_head, read_checkpoint_meta
from slidemil.config import load_config
from slidemil.errors import ConfigError
from slidemil.models.backbones import create_backbone, load_backbone, state_dict_sha256
from slidemil.models.mil import BagHead
from slidemil.models.preprocess import UInt8Backbone
from slidemil.models.weights import tensors_sha256
from slidemil.slide.grid import TileSpec
from slidemil.slide.synth import SynthConfig, make_cohort
from slidemil.slide.tiling import TilingConfig
from slidemil.tile import tile_slides
from slidemil.trainer.augment import augment_bags, augment_tiles, bag_generator, draw_params
from slidemil.trainer.config import AugmentConfig, TrainConfig
from slidemil.trainer.end2end import enable_grad_checkpointing, freeze
from slidemil.trainer.loop import EpochResult, Trainer
from slidemil.trainer.run import cpu_threads, run_training
from slidemil.trainer.tile_data import TileBagDataset, TileSource

REPO = Path(__file__).resolve().parents[1]
TILE_PX = 64


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic slides (lesions on 15% of the tissue of positives), tiled at 64 px / 1 um per px
    (~40 tiles each), with a fixed stratified split: 10 train, 4 validation, 6 test slides."""
    root = tmp_path_factory.mktemp("e2e")
    table = make_cohort(root, SynthConfig(n_slides=20, size=1536, lesion_fraction=0.15, seed=0), progress=False)
    tile_slides(root / "slides", root / "tiles", TilingConfig(tile=TileSpec(patch_size=TILE_PX, mpp=1.0)))
    split = np.empty(len(table), dtype=object)
    for label in (0, 1):
        rows = np.flatnonzero(table["label"] == label)
        split[rows] = ["train"] * 5 + ["val"] * 2 + ["test"] * (len(rows) - 7)
    table.assign(split=split).drop(columns="path").to_csv(root / "labels.csv", index=False)
    return root


def e2e_config(root: Path, **changes):  # type: ignore[no-untyped-def]
    """Settings that learn the cohort in a few CPU seconds (slide paths from the coords folder's record;
    one thread: on a CPU shared with other jobs, more threads than free cores slow torch down manyfold)."""
    overrides = {"data.metadata": str(root / "labels.csv"), "data.coords": str(root / "tiles"), "data.mode": "end2end",
                 "backbone.name": "test_resnet", "backbone.weights": "random", "data.max_patches": 12,
                 "data.eval_patches": 24, "optim.epochs": 7, "optim.lr": 2e-3, "optim.warmup_epochs": 0,
                 "optim.patience": 0, "model.dropout": 0.0, "model.hidden_dim": 64, "model.attention_dim": 32,
                 "log.tensorboard": False, "log.progress": False, "threads": 1, **changes}
    return load_config(TrainConfig, None, overrides)


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("run")
    (result,) = run_training(e2e_config(cohort, calibrate=True), out)
    return out, result


def test_tiny_backbone_learns_the_cohort_end_to_end(trained) -> None:  # type: ignore[no-untyped-def]
    out, result = trained
    assert result.test_metrics["auc"] >= 0.75 and result.val_metrics["auc"] >= 0.75
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 7 and metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    meta = read_checkpoint_meta(out / "checkpoint_best")
    assert meta["mode"] == "end2end" and meta["backbone_weights"] == "inside"
    assert meta["tiling"]["tile"]["patch_size"] == TILE_PX and not (out / "backbone").exists()
    weights = load_file(out / "checkpoint_best.safetensors")
    backbone_state = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    card = meta["backbone_card"]
    assert card["weights_sha256"] == tensors_sha256(backbone_state) and card["weights_source"] == "fine-tuned:random"
    torch.manual_seed(0)  # the run's seed: the weights it started from
    start, start_card = create_backbone("test_resnet", "random")
    assert state_dict_sha256(start) == start_card.weights_sha256 != card["weights_sha256"]
    # the calibration temperature lives in the head, and at the top of the JSON
    t = meta["temperature"]
    assert t != 1.0 and float(weights["head.temperature"]) == pytest.approx(t)
    assert json.loads((out / "test_metrics.json").read_text())["temperature"] == t


def test_checkpoint_round_trips_to_torch_export_and_extraction(  # type: ignore[no-untyped-def]
        trained, cohort: Path, tmp_path: Path) -> None:
    from slidemil.exporter.export import ExportConfig, export_checkpoint
    from slidemil.exporter.parity import ParityConfig
    from slidemil.features.extract import ExtractConfig, prepare_backbone
    from slidemil.runtime.runners import OnnxRuntimeRunner

    out, _ = trained
    backbone, card = load_checkpoint_backbone(out / "checkpoint_best")
    weights = load_file(out / "checkpoint_best.safetensors")
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, weights[f"backbone.{key}"])
    head, meta = load_head(out / "checkpoint_best")
    # the torch model reproduces a test prediction from the slide's fixed evaluation tiles
    preds = pd.read_csv(out / "test_predictions.csv", dtype={"slide_id": str})
    row = preds.iloc[0]
    dataset = TileBagDataset([row.slide_id], [TileSource(cohort / "slides" / f"{row.slide_id}.svs",
                                                         cohort / "tiles" / "coords" / f"{row.slide_id}.h5")],
                             np.array([row.label]), max_patches=24, seed=0)
    tiles = dataset[0].inputs.numpy()
    with torch.no_grad():
        features = UInt8Backbone(backbone, card).eval()(torch.from_numpy(tiles))
        probs = BagHead(head)(features)[1].numpy()
    assert probs[1] == pytest.approx(row.prob_1, abs=1e-5)
    # the package carries the fine-tuned backbone and the calibrated head
    quick = ParityConfig(n_tiles=16, batch_sizes=(1, 16), bag_sizes=(1, 50), n_slide_bags=2)
    pkg = export_checkpoint(out / "checkpoint_best", tmp_path / "model", ExportConfig(parity=quick, exporter="legacy"))
    assert pkg.card.weights_sha256 == card.weights_sha256 and pkg.tile_px == TILE_PX
    assert pkg.manifest.mil.temperature == pytest.approx(meta["temperature"])
    with OnnxRuntimeRunner(pkg.backbone_onnx) as b, OnnxRuntimeRunner(pkg.head_onnx) as h:
        onnx_probs = h.infer({"features": b.infer({"tiles": tiles})["features"]})["probabilities"]
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-5)
    # `slidemil extract --checkpoint` records the fine-tuned backbone with its weights
    module, extract_card = prepare_backbone(ExtractConfig(checkpoint=str(out / "checkpoint_best")), tmp_path / "feats")
    saved, saved_card = load_backbone(tmp_path / "feats" / "backbone")
    assert saved_card.weights_sha256 == extract_card.weights_sha256 == card.weights_sha256


def test_frozen_stages_do_not_change(cohort: Path, tmp_path: Path) -> None:
    # BatchNorm in training mode, so that the trainable stage's statistics move while the frozen ones may not
    cfg = e2e_config(cohort, **{"optim.epochs": 1, "data.max_patches": 6, "data.eval_patches": 6,
                                "backbone.freeze_until": "layer3", "backbone.batchnorm": "train",
                                "backbone.lr": 1e-3, "augment.stain": 0.05})
    run_training(cfg, tmp_path / "stage")
    torch.manual_seed(0)
    start_model = create_backbone("test_resnet", "random")[0]
    start = start_model.state_dict()
    after = {k[len("backbone."):]: v for k, v in load_file(tmp_path / "stage" / "checkpoint_last.safetensors").items()
             if k.startswith("backbone.")}
    frozen = [k for k in start if not k.startswith("layer4.")]
    assert [k for k in frozen if not torch.equal(start[k], after[k])] == []
    assert not torch.equal(start["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert not torch.equal(start["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    state = json.loads((tmp_path / "stage" / "checkpoint_last.state.json").read_text())["state"]
    groups = state["optimizer"]["param_groups"]
    layer4 = [n for n, _ in start_model.named_parameters() if n.startswith("layer4.")]
    assert [g["name"] for g in groups] == ["head", "backbone"] and len(groups[1]["params"]) == len(layer4)
    assert groups[1]["lr"] < groups[0]["lr"]  # the backbone's own learning rate (cosine-scaled alike)

    cfg = e2e_config(cohort, **{"optim.epochs": 1, "data.max_patches": 6, "data.eval_patches": 6,
                                "backbone.freeze": True, "backbone.batchnorm": "train"})
    run_training(cfg, tmp_path / "head_only")
    meta = read_checkpoint_meta(tmp_path / "head_only" / "checkpoint_last")
    assert meta["backbone_card"]["weights_sha256"] == tensors_sha256(start)  # not one bit moved
    assert meta["backbone_card"]["weights_source"] == "random"

    with pytest.raises(ConfigError, match="layer1, layer2, layer3, layer4"):
        freeze(create_backbone("test_resnet", "random")[0], "layer9")


class Killed(Exception):
    pass


def test_resume_continues_exactly(cohort: Path, tmp_path: Path) -> None:
    cfg = e2e_config(cohort, **{"optim.epochs": 2, "data.max_patches": 6, "data.eval_patches": 6,
                                "backbone.lr": 1e-3, "augment.stain": 0.05})
    run_training(cfg, tmp_path / "full")

    def kill_after_1(trainer: Trainer, result: EpochResult) -> None:
        if result.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, tmp_path / "part", callbacks=[kill_after_1])
    run_training(cfg, tmp_path / "part", resume=True)
    a, b = (load_file(tmp_path / d / "checkpoint_last.safetensors") for d in ("full", "part"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    full, part = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("full", "part"))
    cols = [c for c in full.columns if c not in ("seconds", "bags_per_s")]
    pd.testing.assert_frame_equal(full[cols], part[cols], rtol=1e-6)


@pytest.mark.timeout(150)
def test_two_rank_gloo_run_matches_single_process(cohort: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    settings = ["--epochs", "2", "--max-patches", "8", "--eval-patches", "16", "--lr", "2e-3", "--warmup-epochs", "0",
                "--hidden-dim", "64", "--dropout", "0", "--device", "cpu", "--threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slidemil", "train", "--mode", "end2end", "--metadata", str(cohort / "labels.csv"),
           "--coords", str(cohort / "tiles"), "--backbone", "test_resnet", "--weights", "random",
           "--out", str(tmp_path / "ddp"), "--batch-size", "1", "--workers", "1", *settings]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one process, a batch of 1 and 2 batches per step: the same bags per step as 2 ranks x 1
    cfg = e2e_config(cohort, **{"optim.epochs": 2, "data.max_patches": 8, "data.eval_patches": 16,
                                "model.attention_dim": 128, "optim.patience": 12, "optim.accumulate": 2})
    run_training(cfg, tmp_path / "single")
    ddp, single = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("ddp", "single"))
    cols = [c for c in single.columns if c not in ("seconds", "bags_per_s")]
    pd.testing.assert_frame_equal(ddp[cols], single[cols], rtol=1e-5, atol=1e-6)
    a, b = (pd.read_csv(tmp_path / d / "test_predictions.csv") for d in ("ddp", "single"))
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-6)
    x, y = (load_file(tmp_path / d / "checkpoint_last.safetensors") for d in ("ddp", "single"))
    for key in y:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-5)
    assert read_checkpoint_meta(tmp_path / "ddp" / "checkpoint_best")["mode"] == "end2end"


def test_augmentation_is_keyed_by_bag_and_keeps_tiles_uint8() -> None:
    cfg = AugmentConfig(stain=0.05)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8))
    both = augment_bags(tiles, [3, 4], [(0, 1, 5), (0, 1, 6)], cfg)
    alone = augment_bags(tiles[3:], [4], [(0, 1, 6)], cfg)
    assert both.dtype == torch.uint8 and both.shape == tiles.shape
    assert torch.equal(both[3:], alone)  # a bag's draw does not depend on its batch neighbours
    assert not torch.equal(augment_bags(tiles[3:], [4], [(0, 2, 6)], cfg), alone)  # the next epoch differs
    identity = draw_params(7, AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, flips=False),
                           bag_generator(0, 1, 0))
    assert torch.equal(augment_tiles(tiles, identity, AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0,
                                                                    flips=False)), tiles)
    grid = torch.arange(4 * 4 * 3, dtype=torch.uint8).view(1, 4, 4, 3).repeat(8, 1, 1, 1)
    params = draw_params(8, AugmentConfig(), bag_generator(0, 0, 0))
    params = type(params)(torch.arange(8), params.colour, params.stain)
    flipped = augment_tiles(grid, params, AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0))
    assert len({t.numpy().tobytes() for t in flipped}) == 8  # the 8 symmetries of a square


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model, _ = create_backbone("test_resnet", "random")
    x = torch.randn(4, 3, 32, 32)
    grads = []
    with cpu_threads(1):
        for checkpointing in (False, True):
            if checkpointing:
                enable_grad_checkpointing(model)
            model.train().zero_grad()
            model(x).square().sum().backward()
            grads.append(model.layer4[0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_amp_channels_last_and_checkpointing_on_gpu(cohort: Path, tmp_path: Path, amp_dtype: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = e2e_config(cohort, **{"device": "cuda", "amp": True, "amp_dtype": amp_dtype, "optim.epochs": 3,
                                "backbone.grad_checkpointing": True, "data.workers": 2})
    (result,) = run_training(cfg, tmp_path)
    assert np.isfinite(pd.read_csv(tmp_path / "metrics.csv")["train_loss"]).all() and result.test_metrics["n"] == 6
    backbone, card = load_checkpoint_backbone(tmp_path / "checkpoint_best")  # float32 weights, checked sha256
    assert all(v.dtype == torch.float32 for v in backbone.state_dict().values() if v.is_floating_point())
