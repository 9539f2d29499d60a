"""Slide-level classification losses, created by name, and class-balancing weights.

The heads' own instance-level terms (max-instance, CLAM's clustering) live with the heads
(:meth:`slidemil.models.mil.MILHead.auxiliary_loss`); ``max_instance_loss`` is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidemil.errors import ConfigError, LabelTableError
from slidemil.models.mil import max_instance_loss

__all__ = ["LOSSES", "FocalLoss", "inverse_frequency_weights", "make_loss", "max_instance_loss", "register_loss",
           "sample_weights_for_balancing"]

LossFactory = Callable[[torch.Tensor | None, float, float], nn.Module]
LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Register a loss factory ``(class_weights, focal_gamma, label_smoothing) -> nn.Module``."""

    def decorator(factory: LossFactory) -> LossFactory:
        LOSSES[name] = factory
        return factory

    return decorator


def _class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise LabelTableError(f"labels must be a 1-D array of class indices, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise LabelTableError(f"labels must lie in [0, {n_classes}); found {y.min()}..{y.max()}")
    return np.bincount(y, minlength=n_classes)


def inverse_frequency_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Class weights ``n_samples / (n_classes * count_c)`` (float32, (C,)); 1 for balanced data.

    Raises:
        LabelTableError: when a class has no sample, naming it (its weight would be infinite).
    """
    counts = _class_counts(labels, n_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise LabelTableError(
            f"class(es) {empty} have no training sample; cannot weight them (class counts: {counts.tolist()})"
        )
    weights = counts.sum() / (n_classes * counts.astype(np.float64))
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights_for_balancing(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights ``1 / count(label)`` (float64, (N,)) for ``WeightedRandomSampler``.

    Each class then carries the same total weight, so it is drawn equally often.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise LabelTableError(f"labels must be 1-D, got shape {y.shape}")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


class FocalLoss(nn.Module):
    """Multi-class focal loss on logits (Lin et al., 2017), with class weights and label smoothing.

    Per sample, with smoothed target ``q = (1 - eps) * onehot + eps / C`` and probabilities ``p``:
    ``loss = -sum_c q_c * w_c * (1 - p_c) ** gamma * log p_c``. The mean reduction divides by
    ``sum_i w[y_i]`` as ``torch.nn.functional.cross_entropy`` does, so ``gamma = 0`` is exactly
    cross-entropy with the same weights and smoothing.
    """

    weight: torch.Tensor | None  # buffer, (C,) class weights

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, C) against integer targets (B,)."""
        assert logits.ndim == 2 and target.ndim == 1 and len(logits) == len(target), (
            logits.shape,
            target.shape,
        )
        n_classes = logits.shape[1]
        log_p = F.log_softmax(logits, dim=1)
        q = F.one_hot(target, n_classes).to(log_p.dtype) * (1.0 - self.label_smoothing)
        q = q + self.label_smoothing / n_classes
        w = (
            torch.ones(n_classes, dtype=log_p.dtype, device=log_p.device)
            if self.weight is None
            else self.weight.to(device=log_p.device, dtype=log_p.dtype)
        )
        terms = -q * w * log_p
        if self.gamma > 0:
            terms = terms * (1.0 - log_p.exp()).clamp(min=0.0) ** self.gamma
        per_sample = terms.sum(dim=1)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.sum() / w[target].sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


@register_loss("ce")
def _cross_entropy(
    class_weights: torch.Tensor | None, focal_gamma: float, label_smoothing: float
) -> nn.Module:
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


@register_loss("focal")
def _focal(class_weights: torch.Tensor | None, focal_gamma: float, label_smoothing: float) -> nn.Module:
    return FocalLoss(gamma=focal_gamma, weight=class_weights, label_smoothing=label_smoothing)


def make_loss(
    name: str,
    class_weights: torch.Tensor | None = None,
    focal_gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Create the loss registered as ``name`` (``"ce"`` or ``"focal"``).

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](class_weights, focal_gamma, label_smoothing)
