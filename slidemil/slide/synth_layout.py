"""Layout of a synthetic slide: where the tissue lies and where its lesions sit (in mask cells).

``plan_layout`` draws a smooth tissue field of a few blobs with ragged edges, drops specks, and
places non-overlapping lesions well inside the tissue; ``BandPainter`` in
:mod:`slidemil.slide.synth_texture` paints pixels from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

EDGE_NOISE_PX = 3.0  # roughness of tissue edges (std of their displacement), level-0 px


def standardise(a: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation, float32."""
    return ((a - a.mean()) / (a.std() + 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class Lesion:
    """A compact lesion: a disc whose radius wobbles with a few low harmonics (level-0 px)."""

    cx: float
    cy: float
    r0: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    @property
    def rmax(self) -> float:
        return self.r0 * (1 + sum(self.amps))

    def inside(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Bool (len(ys), len(xs)): which pixels (by their centres) lie in the lesion."""
        dy = (ys[:, None] + 0.5 - self.cy).astype(np.float32)
        dx = (xs[None, :] + 0.5 - self.cx).astype(np.float32)
        theta = np.arctan2(dy, dx)
        radius = np.ones_like(theta)
        for j, (a, ph) in enumerate(zip(self.amps, self.phases, strict=True), start=2):
            radius += a * np.cos(j * theta + ph)
        return dx * dx + dy * dy <= (self.r0 * radius) ** 2


@dataclass(frozen=True)
class SlideLayout:
    """Where tissue and lesions are: a coarse field (tissue where >= 0) and lesion shapes.

    The field lives on the mask grid (one cell = ``cell`` level-0 px) and is linearly
    interpolated to level 0, where periodic noise roughens the tissue edge by a few px. The
    noise's weight follows the field's local slope, so that it moves the edge by the same number
    of pixels everywhere and never speckles flat stretches of the field that lie close to zero.
    """

    width: int
    height: int
    cell: int
    grids: np.ndarray  # (height // cell, width // cell, 2) float32: field, edge-noise weight
    lesions: tuple[Lesion, ...]

    @property
    def field(self) -> np.ndarray:
        """The tissue field on the mask grid; tissue where >= 0."""
        return self.grids[..., 0]


def plan_layout(
    width: int, height: int, cell: int, n_lesions: int, lesion_fraction: float, rng: np.random.Generator
) -> SlideLayout:
    """Draw the tissue field and place ``n_lesions`` lesions covering ``lesion_fraction`` of tissue."""
    raw = _tissue_field(height // cell, width // cell, rng)
    field, dropped = _drop_specks(raw, min_cells=max(4, raw.size // 500))
    gy, gx = np.gradient(raw)
    weight = EDGE_NOISE_PX / cell * np.hypot(gx, gy)  # field units per px of edge displacement
    weight[cv2.dilate(dropped.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0] = 0
    lesions: tuple[Lesion, ...] = ()
    if n_lesions > 0:
        lesions = _place_lesions(field >= 0, cell, n_lesions, lesion_fraction, rng)
    return SlideLayout(width, height, cell, np.stack([field, weight], axis=-1).astype(np.float32), lesions)


def _tissue_field(hm: int, wm: int, rng: np.random.Generator) -> np.ndarray:
    """A few smooth blobs plus low-frequency noise, thresholded to cover 35-50 % of the slide."""
    v, u = (np.mgrid[0:hm, 0:wm].astype(np.float32) + 0.5) / wm
    field = np.zeros((hm, wm), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8) * hm / wm
        sx, sy, ang = rng.uniform(0.08, 0.18), rng.uniform(0.08, 0.18), rng.uniform(0, math.pi)
        du, dv = u - cx, v - cy
        a, b = du * math.cos(ang) + dv * math.sin(ang), -du * math.sin(ang) + dv * math.cos(ang)
        field = np.maximum(field, np.exp(-0.5 * (a * a / sx**2 + b * b / sy**2)))
    noise = cv2.GaussianBlur(rng.standard_normal((hm, wm)).astype(np.float32), (0, 0), 0.035 * wm)
    field += 0.12 * standardise(noise)
    edge = np.minimum(np.minimum(u, wm / wm - u), np.minimum(v, hm / wm - v))
    # keep tissue off the slide's border, bending its outline smoothly rather than cutting it
    field -= 1.5 * (np.clip(0.12 - edge, 0, None) / 0.12) ** 2
    return field - np.quantile(field, 1 - rng.uniform(0.35, 0.5))


def _drop_specks(field: np.ndarray, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove small tissue islands and fill small holes; return the field and the cells changed."""
    out = field.copy()
    dropped = np.zeros(field.shape, bool)
    for is_tissue, fill in ((True, -0.05), (False, 0.05)):
        mask = ((out >= 0) == is_tissue).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for i in range(1, n):
            if stats[i, cv2.CC_STAT_AREA] < min_cells:
                out[labels == i] = fill
                dropped |= labels == i
    return out, dropped


def _place_lesions(
    tissue: np.ndarray, cell: int, n: int, fraction: float, rng: np.random.Generator
) -> tuple[Lesion, ...]:
    """Place ``n`` non-overlapping lesions well inside tissue, of total area ``fraction`` of it."""
    depth = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5) * cell  # level-0 px
    ys, xs = np.nonzero(tissue)
    centres_y, centres_x = (ys + 0.5) * cell, (xs + 0.5) * cell
    area = fraction * tissue.sum() * cell * cell / n
    placed: list[Lesion] = []
    for _ in range(n):
        amps = tuple(float(a) for a in rng.uniform(0.0, 0.1, 3))
        phases = tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 3))
        r0 = math.sqrt(area / (math.pi * (1 + 0.5 * sum(a * a for a in amps))))
        room = depth[ys, xs] - (r0 * (1 + sum(amps)) + 2 * cell)
        for other in placed:
            gap = np.hypot(centres_x - other.cx, centres_y - other.cy) - other.rmax - cell
            room = np.minimum(room, gap - r0 * (1 + sum(amps)))
        ok = np.flatnonzero(room >= 0)
        if ok.size:
            pick = int(rng.choice(ok))
        else:
            pick = int(np.argmax(room))
            log.warning("lesion %d of %d does not fit inside tissue; it will be clipped", len(placed) + 1, n)
        jit = rng.uniform(-cell / 2, cell / 2, 2)
        placed.append(
            Lesion(float(centres_x[pick] + jit[0]), float(centres_y[pick] + jit[1]), r0, amps, phases)
        )
    return tuple(placed)
