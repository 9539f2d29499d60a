"""Painting of synthetic H&E-like slides: textures and bands (the layout is ``synth_layout``).

Everything here is numpy/cv2 on small arrays, except :meth:`BandPainter.paint`, which composes
one horizontal band of level 0 (a row of tiles) from pre-rendered periodic textures, so that a
slide is painted in bounded memory and never as a full-resolution float image.

Colour model: Beer-Lambert optical density, ``rgb = 255 * 10 ** -(base + e * E + h * H)``, with
an eosin vector ``E`` (pink stroma and cytoplasm) and a haematoxylin vector ``H`` (purple
nuclei) that vary a little from slide to slide, like stain batches do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from slidemil.slide.synth_layout import Lesion, SlideLayout, standardise

log = logging.getLogger(__name__)

GLASS_RGB = (240.0, 240.0, 238.0)
TEXTURE_PERIOD = 1000  # not a multiple of any tile size: tiles on a grid see different crops
GLASS_PERIOD = 509
_E_OD = np.array([0.036, 0.202, 0.106], np.float32)  # eosin: (235, 160, 200) at unit strength
_H_OD = np.array([0.503, 0.628, 0.231], np.float32)  # haematoxylin: (80, 60, 150) at unit strength
_BASE_OD = 0.05  # every bit of tissue absorbs a little: no tissue is as bright as glass
SUBTLE_MIX = 0.4  # a subtle lesion sits this far from normal tissue towards its class look


@dataclass(frozen=True)
class TextureParams:
    """Look of one kind of tissue (densities per 1000 level-0 px², lengths in level-0 px)."""

    nuclei_density: float
    nuclei_radius: float
    radius_sd: float
    elongation: float  # 0 = round nuclei; 0.5 = spindle-shaped
    h_strength: float  # haematoxylin uptake of nuclei
    e_strength: float  # eosin uptake of stroma and cytoplasm
    cyto_h: float  # haematoxylin in the cytoplasm (basophilia: bluer background)
    gland_density: float  # glands (pale lumens ringed by nuclei) per 1000 px²
    lumen_radius: float


NORMAL = TextureParams(1.4, 4.5, 0.8, 0.45, 0.9, 1.0, 0.0, 0.0, 0.0)
# class 1: dense sheets of large, dark, crowded nuclei; class 2: glands in bluish cytoplasm
_CLASS_LOOKS = {
    1: TextureParams(3.2, 7.5, 1.8, 0.1, 1.25, 0.75, 0.12, 0.0, 0.0),
    2: TextureParams(2.2, 5.0, 0.8, 0.2, 1.05, 0.8, 0.3, 0.05, 18.0),
}


def lesion_params(label: int, subtle: bool = False) -> TextureParams:
    """Return the look of lesions of class ``label`` (>= 1); classes above 2 get a seeded look."""
    if label < 1:
        raise ValueError(f"class {label} has no lesions")
    look = _CLASS_LOOKS.get(label)
    if look is None:
        r = np.random.default_rng([label, 7])
        look = TextureParams(
            nuclei_density=float(r.uniform(2.0, 3.5)),
            nuclei_radius=float(r.uniform(5.0, 8.0)),
            radius_sd=1.2,
            elongation=float(r.uniform(0.0, 0.3)),
            h_strength=float(r.uniform(1.0, 1.3)),
            e_strength=float(r.uniform(0.6, 0.9)),
            cyto_h=float(r.uniform(0.1, 0.35)),
            gland_density=float(r.choice([0.0, 0.04])),
            lumen_radius=float(r.uniform(12.0, 22.0)),
        )
    if subtle:
        look = _mix(NORMAL, look, SUBTLE_MIX)
    return look


def _mix(a: TextureParams, b: TextureParams, t: float) -> TextureParams:
    values = {f.name: (1 - t) * getattr(a, f.name) + t * getattr(b, f.name) for f in dataclasses.fields(a)}
    if b.gland_density > 0:  # glands keep their size when made subtle, only become rarer
        values["lumen_radius"] = b.lumen_radius
    return TextureParams(**values)


@dataclass(frozen=True)
class Stain:
    """Optical-density vectors of one slide's staining."""

    e_od: np.ndarray  # (3,) float32
    h_od: np.ndarray  # (3,) float32

    @classmethod
    def random(cls, rng: np.random.Generator) -> Stain:
        """A stain batch: overall strength +-12 %, per-channel hue +-6 %."""
        e = _E_OD * rng.uniform(0.88, 1.12) * rng.uniform(0.94, 1.06, 3)
        h = _H_OD * rng.uniform(0.88, 1.12) * rng.uniform(0.94, 1.06, 3)
        return cls(e.astype(np.float32), h.astype(np.float32))


def _wrap_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Small Gaussian blur of a periodic (H, W, C) image (the result tiles seamlessly)."""
    pad = int(math.ceil(3 * sigma)) + 1
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    return cv2.GaussianBlur(big, (0, 0), sigmaX=sigma)[pad:-pad, pad:-pad]


def _fft_blur(img: np.ndarray, sigma_u: float, sigma_v: float, angle: float = 0.0) -> np.ndarray:
    """Anisotropic Gaussian blur of a periodic 2-D image, in the Fourier domain (exactly periodic).

    ``sigma_u`` lies along ``angle`` (radians from the x axis), ``sigma_v`` across it.
    """
    h, w = img.shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    ku = kx * math.cos(angle) + ky * math.sin(angle)
    kv = -kx * math.sin(angle) + ky * math.cos(angle)
    gain = np.exp(-2 * math.pi**2 * (sigma_u**2 * ku * ku + sigma_v**2 * kv * kv)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(img) * gain, s=(h, w)).astype(np.float32, copy=False)


def _periodic_noise(rng: np.random.Generator, period: int, sigma: float) -> np.ndarray:
    return standardise(_fft_blur(rng.standard_normal((period, period), np.float32), sigma, sigma))


def _fibres(rng: np.random.Generator, period: int) -> np.ndarray:
    """Stroma fibre pattern: two fibre orientations mixed by a slowly varying weight, std 1."""
    orient = []
    for _ in range(2):
        noise = rng.standard_normal((period, period), np.float32)
        orient.append(standardise(_fft_blur(noise, 5.0, 1.6, rng.uniform(0, math.pi))))
    weight = 1 / (1 + np.exp(-3.0 * _periodic_noise(rng, period, 40.0)))
    return standardise(weight * orient[0] + (1 - weight) * orient[1])


def _wrapped_centres(rng: np.random.Generator, n: int, period: int, margin: float) -> np.ndarray:
    """``n`` uniform points on the torus, plus their copies that reach into a ``margin`` halo."""
    pts = rng.uniform(0, period, (n, 2))
    copies = [pts + (dx, dy) for dx in (-period, 0, period) for dy in (-period, 0, period)]
    allp = np.concatenate(copies)
    keep = np.all((allp > -margin) & (allp < period + margin), axis=1)
    idx = np.tile(np.arange(n), 9)[keep]
    return np.concatenate([allp[keep], idx[:, None]], axis=1)


def _draw_nuclei(rng: np.random.Generator, p: TextureParams, period: int) -> np.ndarray:
    """Haematoxylin concentration (P, P) float32 of scattered elliptic nuclei."""
    n = int(p.nuclei_density * period * period / 1000)
    radius = np.clip(rng.normal(p.nuclei_radius, p.radius_sd, n), 2.0, None)
    axes_a = radius * (1 + p.elongation)
    axes_b = radius / (1 + p.elongation)
    angles = rng.uniform(0, 180, n)
    value = rng.uniform(170, 255, n)
    margin = int(np.ceil(axes_a.max())) + 2 if n else 2
    canvas = np.zeros((period + 2 * margin,) * 2, np.uint8)
    for x, y, i in _wrapped_centres(rng, n, period, margin):
        i = int(i)
        centre = (int(round((x + margin) * 4)), int(round((y + margin) * 4)))
        axes = (int(round(axes_a[i] * 4)), int(round(axes_b[i] * 4)))
        cv2.ellipse(canvas, centre, axes, angles[i], 0, 360, int(value[i]), -1, cv2.LINE_AA, 2)
    nuclei = canvas[margin:-margin, margin:-margin].astype(np.float32) / 255
    chromatin = 0.8 + 0.2 * np.clip(_periodic_noise(rng, period, 1.0), -2, 2)
    return nuclei * chromatin * p.h_strength


def _draw_glands(rng: np.random.Generator, p: TextureParams, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Gland lumens (OD scale factor, 1 outside) and the ring of nuclei around them."""
    scale: np.ndarray = np.ones((period, period), np.float32)
    ring: np.ndarray = np.zeros((period, period), np.float32)
    n = int(p.gland_density * period * period / 1000)
    if n == 0:
        return scale, ring
    margin = int(p.lumen_radius * 1.6) + 10
    lumen = np.zeros((period + 2 * margin,) * 2, np.uint8)
    nuc = np.zeros_like(lumen)
    for x, y, _ in _wrapped_centres(rng, n, period, margin):
        r = p.lumen_radius * rng.uniform(0.7, 1.3)
        cx, cy = x + margin, y + margin
        cv2.circle(lumen, (int(cx), int(cy)), int(r), 255, -1, cv2.LINE_AA)
        k = max(6, int(2 * math.pi * (r + 5) / 9))
        for t in np.linspace(0, 2 * math.pi, k, endpoint=False):
            c = (int(cx + (r + 5) * math.cos(t)), int(cy + (r + 5) * math.sin(t)))
            cv2.ellipse(nuc, c, (5, 3), math.degrees(t), 0, 360, 230, -1, cv2.LINE_AA)
    crop = (slice(margin, -margin), slice(margin, -margin))
    scale -= 0.55 * lumen[crop].astype(np.float32) / 255  # pale lumens, still not glass-white
    ring = nuc[crop].astype(np.float32) / 255 * p.h_strength
    return scale, ring


def render_texture(
    params: TextureParams, stain: Stain, rng: np.random.Generator, period: int = TEXTURE_PERIOD
) -> np.ndarray:
    """Render a seamlessly tiling tissue texture.

    Returns:
        uint8 (period, period, 3) RGB.
    """
    eosin = params.e_strength * (1.0 + 0.22 * np.clip(_fibres(rng, period), -2.2, 2.2))
    hema = np.maximum(_draw_nuclei(rng, params, period), params.cyto_h)
    scale, ring = _draw_glands(rng, params, period)
    hema = np.maximum(hema * scale, ring)
    od = _BASE_OD + eosin[..., None] * stain.e_od + hema[..., None] * stain.h_od
    od *= scale[..., None] if params.gland_density > 0 else 1.0
    rgb = np.exp(od * np.float32(-math.log(10)))
    rgb *= 255.0
    rgb += 2.0 * rng.standard_normal(rgb.shape, np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def glass_texture(rng: np.random.Generator, period: int = GLASS_PERIOD) -> np.ndarray:
    """Empty glass: near-white with faint sensor noise; uint8 (period, period, 3)."""
    noise = rng.normal(0, 1.5, (period, period, 3)).astype(np.float32)
    rgb = np.asarray(GLASS_RGB, np.float32) + _wrap_blur(noise, 0.7) * 1.6
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _row_tiled(tex: np.ndarray, offset: int, width: int) -> np.ndarray:
    """Repeat ``tex`` horizontally to ``width`` columns starting at column ``offset``."""
    reps = (offset + width) // tex.shape[1] + 1
    return np.ascontiguousarray(np.tile(tex, (1, reps) + (1,) * (tex.ndim - 2))[:, offset : offset + width])


class BandPainter:
    """Paints horizontal bands of level 0 from a layout and pre-rendered periodic textures.

    Textures are pre-tiled along x once per slide, so a band is a row gather plus masked copies
    (uint8), never per-pixel noise. Bands of any height compose seamlessly.
    """

    def __init__(
        self,
        layout: SlideLayout,
        tissue_tex: np.ndarray,
        lesion_tex: np.ndarray | None,
        rng: np.random.Generator,
    ) -> None:
        self.layout = layout
        w = layout.width
        jitter = _periodic_noise(rng, GLASS_PERIOD, 3.0)
        glass = glass_texture(rng)
        off = rng.integers(0, 1 << 16, 8)
        self._jitter = (_row_tiled(jitter, int(off[0] % GLASS_PERIOD), w), int(off[1]))
        self._glass = (_row_tiled(glass, int(off[2] % GLASS_PERIOD), w), int(off[3]))
        self._tissue = (_row_tiled(tissue_tex, int(off[4] % tissue_tex.shape[1]), w), int(off[5]))
        self._lesion_tex = lesion_tex
        self._lesion_off = (int(off[6]), int(off[7]))

    @staticmethod
    def _rows(tiled: tuple[np.ndarray, int], ys: np.ndarray) -> np.ndarray:
        tex, oy = tiled
        return tex.take((ys + oy) % tex.shape[0], axis=0)

    def grid_rows(self, y0: int, y1: int) -> np.ndarray:
        """The layout grids linearly interpolated to level-0 rows ``y0:y1``: (y1 - y0, width, 2)."""
        lay = self.layout
        hm = lay.grids.shape[0]
        s = np.clip((np.arange(y0, y1) + 0.5) / lay.cell - 0.5, 0, hm - 1)
        i0 = np.floor(s).astype(np.int64)
        i1 = np.minimum(i0 + 1, hm - 1)
        w = (s - i0).astype(np.float32)[:, None, None]
        rows = lay.grids[i0] * (1 - w) + lay.grids[i1] * w
        # same pixel-centre convention as the vertical step above
        return cv2.resize(rows, (lay.width, y1 - y0), interpolation=cv2.INTER_LINEAR)

    def paint(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paint level-0 rows ``y0:y1``.

        Returns:
            rgb uint8 (h, W, 3), tissue bool (h, W), lesion bool (h, W), with h = y1 - y0.
        """
        ys = np.arange(y0, y1)
        grids = self.grid_rows(y0, y1)
        tissue = grids[..., 0] + grids[..., 1] * self._rows(self._jitter, ys) >= 0
        rgb = self._rows(self._glass, ys)
        np.copyto(rgb, self._rows(self._tissue, ys), where=tissue[..., None])
        lesion = np.zeros_like(tissue)
        for les in self.layout.lesions:
            self._paint_lesion(les, y0, y1, rgb, tissue, lesion)
        return rgb, tissue, lesion

    def _paint_lesion(
        self, les: Lesion, y0: int, y1: int, rgb: np.ndarray, tissue: np.ndarray, lesion: np.ndarray
    ) -> None:
        ly0, ly1 = max(y0, int(les.cy - les.rmax) - 1), min(y1, int(les.cy + les.rmax) + 2)
        lx0, lx1 = max(0, int(les.cx - les.rmax) - 1), min(self.layout.width, int(les.cx + les.rmax) + 2)
        if ly0 >= ly1 or lx0 >= lx1 or self._lesion_tex is None:
            return
        ys, xs = np.arange(ly0, ly1), np.arange(lx0, lx1)
        box = (slice(ly0 - y0, ly1 - y0), slice(lx0, lx1))
        inside = les.inside(ys, xs) & tissue[box]
        lesion[box] |= inside
        tex = self._lesion_tex
        crop = tex[
            np.ix_((ys + self._lesion_off[0]) % tex.shape[0], (xs + self._lesion_off[1]) % tex.shape[1])
        ]
        np.copyto(rgb[box], crop, where=inside[..., None])
