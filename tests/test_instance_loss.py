"""The max-instance term of the training loss: by hand, its instance logits, and in the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slidemil.errors import ConfigError
from slidemil.models.mil import AttentionMIL
from slidemil.trainer.config import LossConfig
from slidemil.trainer.data import BagBatch
from slidemil.trainer.features_mode import FeatureMIL
from slidemil.trainer.losses import max_instance_loss
from slidemil.trainer.run import run_training
from tests.trainer_fixtures import fast_config, make_feature_cohort


def test_max_instance_loss_by_hand() -> None:
    logits = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]],
                           [[1.0, 3.0], [0.0, 4.0], [9.0, 9.0]]])  # (B=2, N=3, C=2)
    mask = torch.tensor([[True, True, False], [True, True, False]])  # the third tile is padding
    labels = torch.tensor([0, 1])
    # k=1: per class, the best real tile: bag 0 -> (2, 1), bag 1 -> (1, 4)
    expected = F.cross_entropy(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), labels)
    assert max_instance_loss(logits, mask, labels, k=1) == pytest.approx(float(expected))
    # k=2 (and k above the smallest bag, capped at 2): per class, the mean of the two best tiles
    expected = F.cross_entropy(torch.tensor([[1.0, 0.0], [0.5, 3.5]]), labels)
    for k in (2, 5):
        assert max_instance_loss(logits, mask, labels, k=k) == pytest.approx(float(expected))
    weights = torch.tensor([1.0, 3.0])
    expected = F.cross_entropy(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), labels, weight=weights)
    assert max_instance_loss(logits, mask, labels, 1, weights) == pytest.approx(float(expected))


def test_bag_logits_are_the_attention_weighted_instance_logits() -> None:
    torch.manual_seed(0)
    model = FeatureMIL(AttentionMIL(8, 3, hidden_dim=16, attention_dim=8, dropout=0.0)).eval()
    inputs = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = model(BagBatch(inputs, mask, torch.tensor([0, 2]), torch.tensor([0, 1])))
    inst = model.head.instance_logits(inputs)  # (B, N, C)
    assert inst.shape == (2, 5, 3)
    pooled = torch.einsum("bn,bnc->bc", out.attention, inst)
    torch.testing.assert_close(pooled, out.logits, rtol=1e-5, atol=1e-6)


def test_instance_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        LossConfig(instance_weight=-1.0)
    with pytest.raises(ConfigError):
        LossConfig(instance_k=0)


def test_training_with_and_without_the_instance_term(tmp_path: Path) -> None:
    cohort = make_feature_cohort(tmp_path / "cohort", n_slides=24)
    settings = {"optim.epochs": 3, "data.max_patches": 20, "model.dropout": 0.0}
    (off,) = run_training(fast_config(cohort, **settings, **{"loss.instance_weight": 0.0}), tmp_path / "off")
    (on,) = run_training(fast_config(cohort, **settings, **{"loss.instance_weight": 1.0, "loss.instance_k": 2}),
                         tmp_path / "on")
    assert on.test_metrics["n"] == off.test_metrics["n"] > 0
    import pandas as pd
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("off", "on"))
    assert not a["train_loss"].equals(b["train_loss"])  # the term is in the loss
