"""Attention-based multiple-instance learning heads (Ilse, Tomczak and Welling, ICML 2018).

A bag is the set of tile features of one slide. The head projects each instance, scores it with a
simple (tanh) or gated (tanh * sigmoid) attention network, pools the instances by the softmax of
the scores, and classifies the pooled vector. Padded instances (``mask`` False) get weight exactly
zero and do not change the result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from slidemil import config
from slidemil.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    """Settings of an attention-MIL head.

    Attributes:
        mil_type: "gated" or "simple" (names in ``list_heads()``).
        in_dim: feature width D of the backbone.
        n_classes: number of classes C (>= 2; probabilities are a softmax).
        hidden_dim: width of the instance projection.
        attention_dim: width of the attention network.
        dropout: dropout after the projection (training only).
    """

    mil_type: str = "gated"
    in_dim: int = 1024
    n_classes: int = 2
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.mil_type not in _HEADS:
            raise ConfigError(f"unknown mil_type {self.mil_type!r}; choose one of {list_heads()}")
        for name in ("in_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ConfigError(f"HeadConfig.n_classes must be >= 2 (binary = 2 classes), got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"HeadConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError."""
        return config.from_dict(cls, data)


class MILOutput(NamedTuple):
    """Output of :class:`AttentionMIL` for a batch of B bags of N instances."""

    logits: torch.Tensor  # (B, C), divided by the temperature
    attention: torch.Tensor  # (B, N) softmax weights; 0 on padding; each row sums to 1
    attention_raw: torch.Tensor  # (B, N) scores before the softmax; -inf on padding


class AttentionMIL(nn.Module):
    """Attention-MIL head: (B, N, D) features [+ (B, N) mask] -> :class:`MILOutput`.

    Args:
        in_dim: feature width D.
        n_classes: number of classes C.
        hidden_dim: projection width.
        attention_dim: attention network width.
        dropout: dropout after the projection.
        gated: gated attention (tanh * sigmoid) if True, else simple (tanh).
    """

    config: HeadConfig | None = None  # set by create_head, for exporters and checkpoints
    temperature: torch.Tensor  # buffer, () float: divides the logits (1 until calibrated)

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, gated: bool = True) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.gated = in_dim, n_classes, gated
        self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.register_buffer("temperature", torch.tensor(1.0))  # set by calibration; saved with the head

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Score bags.

        Args:
            features: float (B, N, D).
            mask: bool (B, N), True for real instances; None when no bag is padded.

        Returns:
            MILOutput(logits (B, C), attention (B, N), attention_raw (B, N)).
        """
        self._check_inputs(features, mask)
        h = self.projection(features)  # (B, N, hidden)
        a = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            a = a * torch.sigmoid(self.attention_u(h))
        raw = self.attention_w(a).squeeze(-1)  # (B, N)
        if mask is not None:
            raw = raw.masked_fill(~mask, float("-inf"))
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding never leaks in, even as NaN
        weights = torch.softmax(raw, dim=-1)  # (B, N), exactly 0 where raw = -inf
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (B, hidden)
        logits = self.classifier(pooled) / self.temperature
        return MILOutput(logits, weights, raw)

    def _check_inputs(self, features: torch.Tensor, mask: torch.Tensor | None) -> None:
        if torch.jit.is_tracing():  # traced shapes are tensors; the legacy ONNX exporter warns
            return
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"features must be (B, N, {self.in_dim}), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if mask is None:
            return
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(f"mask must be bool {tuple(features.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one real instance (a row of mask is all False)")


class BagHead(nn.Module):
    """One bag, no batch axis: the module exported as ``head.onnx`` and run by the engine.

    forward(features (N, D)) -> (logits (C), probabilities (C), attention (N), attention_raw (N)).
    Inference only: it starts in eval mode (and puts ``head`` in eval mode).
    """

    def __init__(self, head: AttentionMIL) -> None:
        super().__init__()
        self.head = head
        self.eval()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, D) float -> logits (C), probabilities (C), attention (N), attention_raw (N)."""
        if features.dim() != 2:
            raise ValueError(f"features must be (N, D) for one bag, got {tuple(features.shape)}")
        out = self.head(features.unsqueeze(0))
        logits = out.logits[0]
        return logits, torch.softmax(logits, dim=-1), out.attention[0], out.attention_raw[0]


HeadBuilder = Callable[[HeadConfig], AttentionMIL]
_HEADS: dict[str, HeadBuilder] = {}


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator registering a builder ``(HeadConfig) -> AttentionMIL`` under ``name``."""
    def decorator(fn: HeadBuilder) -> HeadBuilder:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = fn
        return fn
    return decorator


def list_heads() -> list[str]:
    """Registered mil_type names."""
    return sorted(_HEADS)


def _head_args(cfg: HeadConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "mil_type"}


@register_head("gated")
def gated_attention(cfg: HeadConfig) -> AttentionMIL:
    """Gated attention: w = W(tanh(V h) * sigmoid(U h))."""
    return AttentionMIL(**_head_args(cfg), gated=True)


@register_head("simple")
def simple_attention(cfg: HeadConfig) -> AttentionMIL:
    """Simple attention: w = W tanh(V h)."""
    return AttentionMIL(**_head_args(cfg), gated=False)


def create_head(cfg: HeadConfig) -> AttentionMIL:
    """Build the head named by ``cfg.mil_type``; its initialisation follows the torch seed."""
    head = _HEADS[cfg.mil_type](cfg)
    head.config = cfg
    return head
