"""Backbone factory, cards, weight files and the uint8 preprocessing module (offline, tiny models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm/huggingface_hub read it

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from slidemil.errors import ConfigError, WeightsError  # noqa: E402
from slidemil.models.backbones import (  # noqa: E402
    CARD_FILE,
    WEIGHTS_FILE,
    BackboneCard,
    create_backbone,
    list_backbones,
    load_backbone,
    rebuild_backbone,
    save_backbone,
    state_dict_sha256,
)
from slidemil.models.preprocess import UInt8Backbone, normalise_uint8  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _features(model: torch.nn.Module, size: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


@pytest.mark.parametrize(("name", "dim", "overrides"), [
    ("resnet50_trunc", 1024, {}),
    ("resnet50", 2048, {}),
    ("resnet34", 512, {}),
    ("resnet18", 512, {}),
    ("vit_base_patch16_224", 768, {"depth": 1}),
    ("test_resnet", 96, {}),
    ("test_vit", 64, {}),
    ("efficientnet_b0", 1280, {}),
])
def test_named_backbones_give_their_dims(name: str, dim: int, overrides: dict) -> None:
    model, card = create_backbone(name, **overrides)
    assert card.feature_dim == dim
    assert not model.training
    out = _features(model, 64 if "vit" not in name else card.input_size, batch=1)
    assert out.shape == (1, dim) and out.dtype == torch.float32
    assert card.weights_source == "random"
    assert card.weights_sha256 == state_dict_sha256(model)


def test_resnet50_trunc_has_no_layer4_and_imagenet_card() -> None:
    model, card = create_backbone("resnet50_trunc")
    assert not any(k.startswith("layer4.") for k in model.state_dict())
    assert card.timm_name == "resnet50" and card.input_size == 224
    assert card.mean == IMAGENET_MEAN and card.std == (0.229, 0.224, 0.225)


def test_vit_base_card_uses_half_mean_std() -> None:
    _, card = create_backbone("vit_base_patch16_224", depth=1)
    assert card.mean == (0.5, 0.5, 0.5) and card.std == (0.5, 0.5, 0.5)
    assert card.input_size == 224 and card.interpolation == "bicubic"


@pytest.mark.parametrize(("name", "dim"), [
    ("uni", 1024), ("uni2_h", 1536), ("virchow2", 2560), ("h_optimus_0", 1536), ("gigapath", 1536),
])
def test_foundation_models_build_offline_with_their_dims(name: str, dim: int) -> None:
    model, card = create_backbone(name, depth=1)
    assert card.feature_dim == dim and card.input_size == 224
    assert card.timm_kwargs["depth"] == 1
    if name != "h_optimus_0":
        assert card.mean == IMAGENET_MEAN
    json.dumps(card.to_dict())  # JSON-safe, SwiGLUPacked and SiLU included


def test_h_optimus_card_mean_std() -> None:
    _, card = create_backbone("h_optimus_0", depth=1)
    assert card.mean == (0.707223, 0.578729, 0.703617)
    assert card.std == (0.211883, 0.230117, 0.177517)
    assert card.timm_kwargs["dynamic_img_size"] is False


def test_virchow2_concatenates_class_token_and_mean_of_patch_tokens() -> None:
    model, _ = create_backbone("virchow2", depth=1)
    x = torch.randn(2, 3, 28, 28)  # dynamic_img_size: 2 x 2 patches
    with torch.no_grad():
        out = model(x)
        tokens = model.trunk.forward_features(x)
    assert model.trunk.num_prefix_tokens == 5  # class token + 4 registers
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    assert out.shape == (2, 2560)
    torch.testing.assert_close(out, expected)


def test_callable_kwargs_round_trip_through_json() -> None:
    model, card = create_backbone("uni2_h", depth=1)
    assert card.timm_kwargs["mlp_layer"] == "py:timm.layers.SwiGLUPacked"
    assert card.timm_kwargs["act_layer"] == "py:torch.nn.SiLU"
    again = BackboneCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again == card
    rebuilt = rebuild_backbone(again)
    assert type(rebuilt.blocks[0].mlp) is type(model.blocks[0].mlp)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_callable_override_is_encoded() -> None:
    _, card = create_backbone("test_vit", act_layer=torch.nn.SiLU)
    assert card.timm_kwargs["act_layer"] == "py:torch.nn.SiLU"


def test_card_refuses_callables_outside_timm_and_torch() -> None:
    card = create_backbone("test_resnet")[1].to_dict()
    card["timm_kwargs"] = {"act_layer": "py:os.system"}
    with pytest.raises(ConfigError, match="only"):
        rebuild_backbone(BackboneCard.from_dict(card))


def test_unknown_name_and_num_classes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("no_such_net")
    with pytest.raises(ConfigError, match="features-only"):
        create_backbone("test_resnet", num_classes=3)
    assert {"uni", "virchow2", "resnet50_trunc"} <= set(list_backbones())


def test_same_seed_same_weights() -> None:
    torch.manual_seed(3)
    _, a = create_backbone("test_vit")
    torch.manual_seed(3)
    _, b = create_backbone("test_vit")
    assert a.weights_sha256 == b.weights_sha256


def _classifier_source(tmp_path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A timm test_resnet with a 5-class head, its state dict as DDP would save it."""
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=5).eval()
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    assert any(k.startswith("module.fc.") for k in state)
    return source, state


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weights_file_with_head_and_module_prefix(tmp_path: Path, fmt: str) -> None:
    source, state = _classifier_source(tmp_path)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"epoch": 3, "state_dict": state}, path)
    model, card = create_backbone("test_resnet", weights=path)
    assert card.weights_source == f"file:{path.resolve()}"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_full_resnet50_file_loads_into_truncated_model(tmp_path: Path) -> None:
    full = timm.create_model("resnet50", num_classes=1000)
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    model, card = create_backbone("resnet50_trunc", weights=path)
    assert card.feature_dim == 1024
    torch.testing.assert_close(model.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def test_mismatched_weights_file_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"missing .*bn1.*unexpected .*blocks"):
        create_backbone("test_resnet", weights=path)


def test_missing_or_pickled_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("test_resnet", weights=tmp_path / "absent.pth")
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"x": object()}}, path)
    with pytest.raises(WeightsError, match="plain state dict"):
        create_backbone("test_resnet", weights=path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        create_backbone("test_resnet", weights=corrupt)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, card = create_backbone("test_vit")
    written = save_backbone(model, card, tmp_path)
    assert written == card
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CARD_FILE).is_file()
    loaded, loaded_card = load_backbone(tmp_path)
    assert loaded_card == card
    torch.testing.assert_close(_features(loaded, 160), _features(model, 160), rtol=0, atol=0)


def test_save_load_wrapped_foundation_model(tmp_path: Path) -> None:
    model, card = create_backbone("virchow2", depth=1)
    save_backbone(model, card, tmp_path)
    loaded, _ = load_backbone(tmp_path)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    model, card = create_backbone("test_resnet")
    save_backbone(model, card, tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key] = state[key] + 1e-3
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(WeightsError, match="sha256"):
        load_backbone(tmp_path)


def test_save_records_changed_weights(tmp_path: Path) -> None:
    model, card = create_backbone("test_resnet")
    with torch.no_grad():
        model.conv1[0].weight.add_(1.0)
    written = save_backbone(model, card, tmp_path)
    assert written.weights_sha256 != card.weights_sha256
    assert load_backbone(tmp_path)[1] == written


def test_uint8_backbone_equals_manual_normalisation() -> None:
    model, card = create_backbone("test_resnet")
    wrapped = UInt8Backbone(model, card)
    tiles = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8)
    mean, std = torch.tensor(card.mean)[:, None, None], torch.tensor(card.std)[:, None, None]
    manual = (tiles.float().permute(0, 3, 1, 2) / 255 - mean) / std
    with torch.no_grad():
        got = wrapped(tiles)
        expected = model(manual)
    assert got.shape == (2, card.feature_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert set(wrapped.state_dict()) == {f"backbone.{k}" for k in model.state_dict()}


def test_normalise_uint8_is_channels_last_and_checks_input() -> None:
    tiles = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = normalise_uint8(tiles, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="uint8"):
        normalise_uint8(tiles.float(), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="B, H, W, 3"):
        normalise_uint8(tiles.permute(0, 3, 1, 2), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("dynamo", [False, True])
def test_uint8_backbone_onnx_parity(tmp_path: Path, dynamo: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, card = create_backbone("test_resnet")
    wrapped = UInt8Backbone(model, card).eval()
    example = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    path = tmp_path / "backbone.onnx"
    dynamic = ({"dynamic_shapes": {"tiles": {0: torch.export.Dim("batch")}}} if dynamo else
               {"dynamic_axes": {"tiles": {0: "batch"}, "features": {0: "batch"}}})
    torch.onnx.export(wrapped, (example,), str(path), input_names=["tiles"], output_names=["features"],
                      dynamo=dynamo, **dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tiles = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)  # another batch size
    got = session.run(None, {"tiles": tiles.numpy()})[0]
    with torch.no_grad():
        expected = wrapped(tiles).numpy()
    assert got.shape == (3, card.feature_dim) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5
