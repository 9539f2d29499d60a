"""Attention-MIL heads: shapes, masking, registry, temperature, ONNX parity of the bag head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidemil.errors import ConfigError
from slidemil.models.mil import AttentionMIL, BagHead, HeadConfig, MILOutput, create_head, list_heads

D, C = 32, 3


def _head(mil_type: str = "gated", seed: int = 0) -> AttentionMIL:
    torch.manual_seed(seed)
    return create_head(HeadConfig(mil_type=mil_type, in_dim=D, n_classes=C, hidden_dim=16,
                                  attention_dim=8)).eval()


def test_shapes_and_weights_sum_to_one() -> None:
    head = _head()
    out = head(torch.randn(4, 10, D))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (4, C)
    assert out.attention.shape == out.attention_raw.shape == (4, 10)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(torch.softmax(out.attention_raw, dim=1), out.attention)


def test_padding_gets_zero_weight_and_does_not_change_the_bag() -> None:
    head = _head()
    bag = torch.randn(1, 7, D)
    padded = torch.cat([bag, torch.full((1, 5, D), float("nan"))], dim=1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :7] = True
    with torch.no_grad():
        alone, together = head(bag), head(padded, mask)
    assert torch.all(together.attention[:, 7:] == 0.0)
    torch.testing.assert_close(together.logits, alone.logits)
    torch.testing.assert_close(together.attention[:, :7], alone.attention)


def test_batch_of_bags_with_different_lengths_matches_bags_alone() -> None:
    head = _head("simple")
    bags = [torch.randn(n, D) for n in (3, 9, 1)]
    features = torch.zeros(3, 9, D)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    with torch.no_grad():
        batched = head(features, mask).logits
        single = torch.cat([head(bag[None]).logits for bag in bags])
    torch.testing.assert_close(batched, single)


def test_gated_and_simple_differ() -> None:
    gated, simple = _head("gated"), _head("simple")
    assert gated.gated and not simple.gated
    assert gated.attention_u is not None and simple.attention_u is None
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        assert not torch.allclose(gated(x).attention_raw, simple(x).attention_raw)
    assert set(list_heads()) == {"gated", "simple", "clam_sb", "clam_mb", "dsmil", "transmil"}


def test_temperature_divides_logits() -> None:
    head = _head()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        before = head(x).logits
        head.temperature.fill_(2.5)
        after = head(x)
    torch.testing.assert_close(after.logits, before / 2.5)
    assert "temperature" in head.state_dict()


def test_same_seed_same_init() -> None:
    a, b = _head(seed=7), _head(seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_bad_inputs_are_rejected() -> None:
    head = _head()
    with pytest.raises(ValueError, match="B, N"):
        head(torch.randn(5, D))
    with pytest.raises(ValueError, match="B, N"):
        head(torch.randn(1, 5, D + 1))
    with pytest.raises(ValueError, match="mask must be bool"):
        head(torch.randn(1, 5, D), torch.ones(1, 5))
    with pytest.raises(ValueError, match="at least one real instance"):
        head(torch.randn(2, 5, D), torch.tensor([[True] * 5, [False] * 5]))


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ConfigError, match="mil_type"):
        HeadConfig(mil_type="transformer", in_dim=D, n_classes=C)
    with pytest.raises(ConfigError, match="n_classes"):
        HeadConfig(in_dim=D, n_classes=1)
    cfg = HeadConfig(mil_type="simple", in_dim=D, n_classes=C)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    assert create_head(cfg).config == cfg


def test_bag_head_outputs() -> None:
    bag_head = BagHead(_head())
    assert not bag_head.training
    features = torch.randn(11, D)
    logits, probabilities, attention, raw = bag_head(features)
    assert logits.shape == probabilities.shape == (C,)
    assert attention.shape == raw.shape == (11,)
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))
    torch.testing.assert_close(logits, bag_head.head(features[None]).logits[0])


@pytest.mark.parametrize("dynamo", [False, True])
def test_bag_head_onnx_parity_for_any_bag_size(tmp_path: Path, dynamo: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    bag_head = BagHead(_head())
    names = ["logits", "probabilities", "attention", "attention_raw"]
    path = tmp_path / "head.onnx"
    dynamic = ({"dynamic_shapes": {"features": {0: torch.export.Dim("n")}}} if dynamo else
               {"dynamic_axes": {"features": {0: "n"}, "attention": {0: "n"}, "attention_raw": {0: "n"}}})
    torch.onnx.export(bag_head, (torch.randn(16, D),), str(path), input_names=["features"],
                      output_names=names, dynamo=dynamo, **dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 500, 20000):
        features = torch.randn(n, D)
        got = dict(zip(names, session.run(None, {"features": features.numpy()}), strict=True))
        with torch.no_grad():
            expected = dict(zip(names, (t.numpy() for t in bag_head(features)), strict=True))
        assert got["attention"].shape == (n,)
        assert np.abs(got["probabilities"] - expected["probabilities"]).max() <= 1e-5
        assert np.abs(got["attention"] - expected["attention"]).max() <= 1e-5
        assert got["probabilities"].argmax() == expected["probabilities"].argmax()
