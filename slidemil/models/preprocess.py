"""Tile preprocessing: uint8 RGB NHWC -> normalised float NCHW, in one place.

The engine moves uint8 bytes; casting, normalisation and the NHWC -> NCHW permute live in the
model (and so inside the exported ONNX graph). End-to-end training calls the same
:func:`normalise_uint8`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from slidemil.models.backbones import BackboneCard

log = logging.getLogger(__name__)


def normalise_uint8(tiles: torch.Tensor, mean: torch.Tensor | Sequence[float],
                    std: torch.Tensor | Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB tiles (B, H, W, 3) -> normalised (B, 3, H, W) of ``dtype``.

    Computes ``(x / 255 - mean) / std`` in float32 on the tiles' device. The result is a permuted
    view, so its memory is channels_last; call ``.contiguous()`` only if a consumer needs NCHW
    memory.

    Args:
        tiles: uint8 tensor (B, H, W, 3), RGB.
        mean: 3 values (or a tensor broadcastable against (B, H, W, 3)).
        std: 3 values (or a tensor broadcastable against (B, H, W, 3)).
        dtype: dtype of the result (float32, or half/bfloat16 for a half-precision backbone).

    Returns:
        float tensor (B, 3, H, W).
    """
    if not torch.jit.is_tracing():  # traced shapes are tensors; the legacy ONNX exporter warns
        if tiles.dim() != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be (B, H, W, 3) RGB, got shape {tuple(tiles.shape)}")
        if tiles.dtype != torch.uint8:
            raise ValueError(f"tiles must be uint8, got {tiles.dtype}")
    mean = _channel_vector(mean, tiles.device)
    std = _channel_vector(std, tiles.device)
    x = (tiles.to(torch.float32) / 255.0 - mean) / std
    return x.to(dtype).permute(0, 3, 1, 2)


def _channel_vector(values: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32).reshape(1, 1, 1, -1)
    return torch.tensor(tuple(values), dtype=torch.float32, device=device).reshape(1, 1, 1, -1)


class UInt8Backbone(nn.Module):
    """A backbone that takes uint8 RGB tiles (B, H, W, 3) and returns float32 features (B, D).

    This is the module exported as ``backbone.onnx``: cast, normalisation and permute included.

    Args:
        backbone: features-only model, (B, 3, H, W) normalised float -> (B, D).
        card: its preprocessing card (mean, std, feature_dim).
    """

    mean: torch.Tensor  # buffers, (1, 1, 1, 3) float32
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, card: BackboneCard) -> None:
        super().__init__()
        self.backbone = backbone
        self.card = card
        # Non-persistent: the state dict stays the backbone's own (its sha256 is the card's).
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).reshape(1, 1, 1, 3),
                             persistent=False)
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).reshape(1, 1, 1, 3),
                             persistent=False)
        self.fixed_size = card.input_size if needs_fixed_input_size(backbone) else None

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, D) float32."""
        param = next(self.backbone.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = normalise_uint8(tiles, self.mean, self.std, dtype=dtype)
        if self.fixed_size is not None and tuple(x.shape[-2:]) != (self.fixed_size, self.fixed_size):
            # Models with a fixed token grid (ViTs) see tiles resized to their card's size, as TRIDENT does.
            x = F.interpolate(x, size=(self.fixed_size, self.fixed_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.backbone(x).float()


def needs_fixed_input_size(model: nn.Module) -> bool:
    """Whether ``model`` only accepts its configured image size (a timm patch embedding with a strict size).

    Convolutional networks take any tile size (CLAM and TRIDENT feed ResNets 256 px tiles as they are).
    """
    for module in model.modules():
        if hasattr(module, "strict_img_size") and hasattr(module, "img_size"):
            return bool(getattr(module, "strict_img_size", False)) and not getattr(module, "dynamic_img_pad", False)
    return False
