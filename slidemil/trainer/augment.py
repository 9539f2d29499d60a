"""Tile augmentation of end-to-end training: the 8 symmetries of a square, colour and H&E stain jitter.

Works on a batch of uint8 RGB tiles (M, H, W, 3) on the training device and gives uint8 tiles back,
so that normalisation stays in one place (:func:`slidemil.models.preprocess.normalise_uint8`, inside
the model and the exported graph). The per-tile parameters are drawn on the CPU from generators the
caller seeds per bag (seed, epoch, slide), so a bag is augmented the same way on any device, rank or
DataLoader worker, and a resumed run draws what an uninterrupted one would.

Stain jitter follows Tellez et al. (2019, "Quantifying the effects of data augmentation and stain
color normalization"): tiles are unmixed into haematoxylin, eosin and a residual channel by the
Ruifrok-Johnston stain vectors in optical density (OD = -ln I), each channel becomes
``s * (1 + a) + b`` (``a`` relative, ``b`` in OD units), and the result is mixed back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slidemil.trainer.config import AugmentConfig

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of the grey level
_OD_FLOOR = 1.0 / 255.0  # darkest intensity a uint8 tile can hold, keeps -ln finite


@dataclass(frozen=True)
class TileParams:
    """Per-tile augmentation parameters (CPU tensors, M tiles)."""

    symmetry: torch.Tensor  # int64 (M,): rotate by 90 * (k % 4) degrees, then flip left-right if k >= 4
    colour: torch.Tensor  # float32 (M, 4): brightness, contrast, saturation factors, hue in turns
    stain: torch.Tensor  # float32 (M, 2, 3): relative scale a and OD bias b of the H, E, D channels


def draw_params(n: int, cfg: AugmentConfig, generator: torch.Generator) -> TileParams:
    """Parameters of ``n`` tiles from ``generator`` (always the same number of draws per tile)."""
    symmetry = torch.randint(0, 8, (n,), generator=generator)
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1)
    strength = torch.tensor([cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue])
    colour = u * strength
    colour[:, :3] += 1.0
    stain = (torch.rand(n, 2, 3, generator=generator) * 2 - 1) * cfg.stain
    if not cfg.flips:
        symmetry.zero_()
    return TileParams(symmetry, colour, stain)


def bag_generator(seed: int, epoch: int, slide_index: int) -> torch.Generator:
    """The CPU generator of one bag's augmentation in one epoch."""
    state = np.random.SeedSequence([seed, 7_919, epoch, slide_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augment_bags(tiles: torch.Tensor, counts: Sequence[int], keys: Sequence[tuple[int, int, int]],
                 cfg: AugmentConfig) -> torch.Tensor:
    """Augment the tiles of several bags, laid end to end.

    Args:
        tiles: uint8 (M, H, W, 3), the tiles of bag 0, then bag 1, ...; any device.
        counts: tiles per bag (sums to M).
        keys: ``(seed, epoch, slide index)`` of each bag, seeding its parameters.
        cfg: what to apply.

    Returns:
        uint8 (M, H, W, 3) on the tiles' device.
    """
    assert sum(counts) == len(tiles) and len(counts) == len(keys), (len(tiles), counts, keys)
    parts = [draw_params(n, cfg, bag_generator(*key)) for n, key in zip(counts, keys)]
    params = TileParams(*(torch.cat([getattr(p, f) for p in parts]) for f in ("symmetry", "colour", "stain")))
    return augment_tiles(tiles, params, cfg)


def augment_tiles(tiles: torch.Tensor, params: TileParams, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 (M, H, W, 3) -> uint8 (M, H, W, 3): symmetries, then colour jitter, then stain jitter."""
    if tiles.dim() != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(f"tiles must be uint8 (M, H, W, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    if cfg.flips:
        tiles = apply_symmetries(tiles, params.symmetry)
    colour = any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if not colour and cfg.stain <= 0:
        return tiles
    x = tiles.float() / 255.0
    if colour:
        x = jitter_colour(x, params.colour.to(x.device))
    if cfg.stain > 0:
        x = jitter_stain(x, params.stain.to(x.device))
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def apply_symmetries(tiles: torch.Tensor, symmetry: torch.Tensor) -> torch.Tensor:
    """Rotate tile i by 90 * (k % 4) degrees and flip it left-right if k >= 4 (k = ``symmetry[i]``)."""
    if tiles.shape[1] != tiles.shape[2]:
        raise ValueError(f"rotations need square tiles, got {tuple(tiles.shape[1:3])}")
    out = tiles.clone()
    symmetry = symmetry.cpu()
    for k in range(1, 8):
        index = torch.nonzero(symmetry == k).flatten().to(tiles.device)
        if len(index) == 0:
            continue
        part = torch.rot90(tiles.index_select(0, index), k % 4, dims=(1, 2))
        out[index] = torch.flip(part, dims=(2,)) if k >= 4 else part
    return out


def jitter_colour(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of float RGB tiles (M, H, W, 3) in [0, 1]."""
    luma = torch.tensor(_LUMA, device=x.device)
    brightness, contrast, saturation, hue = (factors[:, i].view(-1, 1, 1, 1) for i in range(4))
    x = x * brightness
    mean = (x @ luma).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    x = (x - mean) * contrast + mean
    grey = (x @ luma).unsqueeze(-1)
    x = (x - grey) * saturation + grey
    x = torch.einsum("mhwc,mdc->mhwd", x, hue_rotation(hue.flatten()))
    return x.clamp(0.0, 1.0)


def hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """(M,) hue shifts in turns -> (M, 3, 3) rotations of RGB about the grey axis (Rodrigues)."""
    theta = turns * (2 * math.pi)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    axis = 1 / math.sqrt(3)  # unit grey axis (1, 1, 1) / sqrt(3)
    cross = axis * torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=turns.device)
    outer = torch.full((3, 3), axis * axis, device=turns.device)
    return cos * torch.eye(3, device=turns.device) + sin * cross + (1 - cos) * outer


@functools.lru_cache(maxsize=1)
def stain_matrices() -> tuple[np.ndarray, np.ndarray]:
    """(rgb_from_hed, hed_from_rgb): unit Ruifrok-Johnston H and E vectors, D their cross product."""
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    d = np.cross(h, e)
    rgb_from_hed = np.stack([h, e, d / np.linalg.norm(d)])  # rows: OD of one unit of each stain
    return rgb_from_hed, np.linalg.inv(rgb_from_hed)


def jitter_stain(x: torch.Tensor, stain: torch.Tensor) -> torch.Tensor:
    """H&E stain jitter of float RGB tiles (M, H, W, 3) in [0, 1]; ``stain`` (M, 2, 3) holds a and b."""
    rgb_from_hed, hed_from_rgb = (torch.from_numpy(m).float().to(x.device) for m in stain_matrices())
    od = -torch.log(x.clamp_min(_OD_FLOOR))
    hed = od @ hed_from_rgb
    hed = hed * (1 + stain[:, 0].view(-1, 1, 1, 3)) + stain[:, 1].view(-1, 1, 1, 3)
    return torch.exp(-(hed @ rgb_from_hed)).clamp(0.0, 1.0)
