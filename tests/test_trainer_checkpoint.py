"""Checkpoints: round trips, backbone recovery, resumable state without pickle, damage detection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from slidemil.artifacts import checkpoint as ckpt
from slidemil.errors import CheckpointError
from slidemil.models.backbones import create_backbone, save_backbone, state_dict_sha256
from slidemil.models.mil import HeadConfig, create_head


def _meta(head_cfg: HeadConfig, card: dict | None = None, weights: str | None = None) -> dict:  # type: ignore[type-arg]
    return {"mode": "features", "epoch": 3, "metrics": {"auc": 0.9}, "class_names": ["a", "b"],
            "head_config": head_cfg.to_dict(), "backbone_card": card, "backbone_weights": weights,
            "tiling": None, "train_config": {"seed": 0}}


@pytest.fixture
def saved(tmp_path: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = HeadConfig(in_dim=12, n_classes=2, hidden_dim=8, attention_dim=4)
    head = create_head(cfg)
    head.temperature.fill_(1.7)
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    base = ckpt.save_checkpoint(tmp_path / "checkpoint_best", state, _meta(cfg))
    return base, head.eval()


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_load_head_gives_identical_outputs(saved, suffix: str) -> None:  # type: ignore[no-untyped-def]
    base, head = saved
    loaded, meta = ckpt.load_head(str(base) + suffix)
    assert meta["schema"] == 1 and meta["epoch"] == 3 and meta["class_names"] == ["a", "b"]
    assert float(loaded.temperature) == pytest.approx(1.7)
    x = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    a, b = head(x, mask), loaded(x, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)


def test_tampered_or_missing_files_raise(saved) -> None:  # type: ignore[no-untyped-def]
    base, _ = saved
    weights = base.with_name(base.name + ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        ckpt.load_head(base)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load_head(base)
    base.with_name(base.name + ".json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.read_checkpoint_meta(base)


def test_unknown_schema_and_partial_json_raise(saved) -> None:  # type: ignore[no-untyped-def]
    base, _ = saved
    path = base.with_name(base.name + ".json")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "schema": 99}))
    with pytest.raises(CheckpointError, match="schema 99"):
        ckpt.read_checkpoint_meta(base)
    path.write_text(path.read_text()[:40])
    with pytest.raises(CheckpointError, match="not readable JSON"):
        ckpt.read_checkpoint_meta(base)


def test_resume_state_round_trips_without_pickle(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state = {"optimizer": opt.state_dict(), "rng": [rng],
             "misc": {"best": None, "nan": float("nan"), "t": (1, 2.5, "x")}}
    cfg = HeadConfig(in_dim=4, n_classes=3)
    weights = {f"head.{k}": v for k, v in create_head(cfg).state_dict().items()}
    ckpt.save_checkpoint(tmp_path / "last", weights, _meta(cfg), state)
    back = ckpt.load_training_state(tmp_path / "last.json")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
    assert back["rng"][0]["python"] == rng["python"]
    assert np.array_equal(back["rng"][0]["numpy"][1], rng["numpy"][1]) and back["rng"][0]["numpy"][2:] == rng["numpy"][2:]
    assert torch.equal(back["rng"][0]["torch"], rng["torch"])
    assert back["misc"]["t"] == (1, 2.5, "x") and back["misc"]["best"] is None
    assert "pickle" not in (tmp_path / "last.state.json").read_text()


def test_state_from_another_save_is_refused(tmp_path: Path) -> None:
    cfg = HeadConfig(in_dim=4, n_classes=2)
    ckpt.save_checkpoint(tmp_path / "last", {f"head.{k}": v for k, v in create_head(cfg).state_dict().items()},
                         _meta(cfg), {"x": torch.zeros(2)})
    old_state = (tmp_path / "last.state.json").read_text()
    ckpt.save_checkpoint(tmp_path / "last", {f"head.{k}": v for k, v in create_head(cfg).state_dict().items()},
                         _meta(cfg), {"x": torch.ones(2)})
    (tmp_path / "last.state.json").write_text(old_state)
    with pytest.raises(CheckpointError, match="another save"):
        ckpt.load_training_state(tmp_path / "last")
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.flatten_state({"obj": object()})


def test_backbone_folder_inside_and_missing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone, card = create_backbone("test_resnet", "random")
    card = save_backbone(backbone, card, tmp_path / "feats" / "backbone")
    ckpt.copy_backbone(tmp_path / "feats" / "backbone", tmp_path / "run" / "backbone")
    cfg = HeadConfig(in_dim=card.feature_dim, n_classes=2)
    head = {f"head.{k}": v for k, v in create_head(cfg).state_dict().items()}
    ckpt.save_checkpoint(tmp_path / "run" / "best", head, _meta(cfg, card.to_dict(), "backbone/"))
    model, loaded_card = ckpt.load_checkpoint_backbone(tmp_path / "run" / "best.safetensors")
    assert state_dict_sha256(model) == card.weights_sha256 == loaded_card.weights_sha256

    inside = {**head, **{f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    meta = {**_meta(cfg, card.to_dict(), "inside"), "mode": "end2end"}
    ckpt.save_checkpoint(tmp_path / "e2e" / "best", inside, meta)
    model, _ = ckpt.load_checkpoint_backbone(tmp_path / "e2e" / "best")
    assert state_dict_sha256(model) == card.weights_sha256

    ckpt.save_checkpoint(tmp_path / "none" / "best", head, _meta(cfg))
    with pytest.raises(CheckpointError, match="records no backbone"):
        ckpt.load_checkpoint_backbone(tmp_path / "none" / "best")
    (tmp_path / "run" / "backbone" / "backbone.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot load its backbone"):
        ckpt.load_checkpoint_backbone(tmp_path / "run" / "best")
