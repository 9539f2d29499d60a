"""Losses: class weights by hand, focal loss against cross-entropy, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slidemil.errors import ConfigError, LabelTableError
from slidemil.trainer.losses import (
    FocalLoss,
    inverse_frequency_weights,
    make_loss,
    sample_weights_for_balancing,
)


def test_inverse_frequency_weights_by_hand():
    # 4 samples, 2 classes, counts (3, 1): 4 / (2 * 3) = 2/3 and 4 / (2 * 1) = 2.
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), 2)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([2 / 3, 2.0]))
    # balanced data -> all ones
    assert torch.equal(inverse_frequency_weights(np.array([0, 1, 2, 2, 1, 0]), 3), torch.ones(3))


def test_inverse_frequency_weights_empty_class_or_bad_label():
    with pytest.raises(LabelTableError, match=r"\[2\]"):
        inverse_frequency_weights(np.array([0, 1, 1]), 3)
    with pytest.raises(LabelTableError):
        inverse_frequency_weights(np.array([0, 3]), 2)


def test_sample_weights_for_balancing():
    w = sample_weights_for_balancing(np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1.0])
    labels = np.array(["b", "a", "b", "c", "b"])
    w = sample_weights_for_balancing(labels)
    totals = {c: w[labels == c].sum() for c in "abc"}
    assert totals == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_gamma_zero_is_cross_entropy(smoothing, weighted, reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (16,), generator=gen)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64) if weighted else None
    focal = FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing, reduction=reduction).double()
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(focal(logits, target), ce, rtol=1e-12, atol=1e-12)


def test_focal_by_hand_and_down_weights_easy_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([0, 0])
    p = torch.softmax(logits, dim=1)[torch.arange(2), target]
    expected = (-((1 - p) ** 2) * torch.log(p)).mean()
    loss = FocalLoss(gamma=2.0)(logits, target)
    torch.testing.assert_close(loss, expected)
    assert loss < F.cross_entropy(logits, target)
    # the easy sample (p ~ .88) loses far more of its weight than the hard one (p ~ .38)
    per = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    ce = F.cross_entropy(logits, target, reduction="none")
    assert (per / ce)[0] < (per / ce)[1]


def test_focal_backward_and_weight_buffer():
    focal = FocalLoss(gamma=2.0, weight=torch.tensor([1.0, 3.0]), label_smoothing=0.1)
    assert "weight" in focal.state_dict()
    logits = torch.randn(5, 2, requires_grad=True)
    focal(logits, torch.tensor([0, 1, 1, 0, 1])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_focal_rejects_bad_settings():
    with pytest.raises(ConfigError):
        FocalLoss(gamma=-1)
    with pytest.raises(ConfigError):
        FocalLoss(label_smoothing=1.5)


def test_make_loss_registry():
    w = torch.tensor([1.0, 2.0])
    ce = make_loss("ce", w, label_smoothing=0.1)
    assert isinstance(ce, nn.CrossEntropyLoss) and torch.equal(ce.weight, w) and ce.label_smoothing == 0.1
    focal = make_loss("focal", w, focal_gamma=1.5)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and torch.equal(focal.weight, w)
    assert isinstance(make_loss("focal"), FocalLoss)
    with pytest.raises(ConfigError, match="focal"):
        make_loss("hinge", None)
