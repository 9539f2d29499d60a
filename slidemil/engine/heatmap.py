"""Attention normalisation and heatmap images.

Normalisations are registered by name (``ATTENTION_NORMS``); the name travels into every output.
Maps are float32 with NaN where no tile lies. ``overlay_png`` renders an RGB image laid out as::

    +---------------------------------+--------+
    | title strip (TITLE_PX rows)                |
    +---------------------------------+--------+
    | thumbnail, blended on tissue    | colour |
    | (exactly the thumbnail's h x w) | bar    |
    +---------------------------------+--------+

so ``image[TITLE_PX:, :w]`` is the thumbnail pixel for pixel outside tissue.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from slidemil.errors import ConfigError
from slidemil.slide.grid import TileGrid

TITLE_PX = 32  # height of the title strip
COLORBAR_PX = 96  # width of the colour-bar strip

NormFn = Callable[[np.ndarray], np.ndarray]
ATTENTION_NORMS: dict[str, NormFn] = {}


def register_norm(name: str) -> Callable[[NormFn], NormFn]:
    """Register an attention normalisation ``(N,) -> (N,)`` under ``name``."""
    def decorator(fn: NormFn) -> NormFn:
        ATTENTION_NORMS[name] = fn
        return fn
    return decorator


@register_norm("percentile")
def _percentile(a: np.ndarray) -> np.ndarray:
    """Average 1-based rank / N, as CLAM (``rankdata(a, 'average') / N``): in (0, 1], top tile 1."""
    if a.size == 0:
        return a.astype(np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts  # tiles strictly below each distinct value
    avg_rank = before + (counts + 1) / 2.0
    return avg_rank[inverse.ravel()] / a.size


@register_norm("minmax")
def _minmax(a: np.ndarray) -> np.ndarray:
    """(a - min) / (max - min); all tiles equal (or one tile) gives 0.5 everywhere."""
    if a.size == 0:
        return a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0:
        return np.full(a.shape, 0.5)
    return (a - lo) / (hi - lo)


@register_norm("softmax")
def _softmax(a: np.ndarray) -> np.ndarray:
    """Softmax over the tiles of the slide (sums to 1)."""
    if a.size == 0:
        return a.astype(np.float64)
    e = np.exp(a - a.max())
    return e / e.sum()


@register_norm("raw")
def _raw(a: np.ndarray) -> np.ndarray:
    """The head's attention logits unchanged."""
    return a


def normalize_attention(raw: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Normalise one slide's raw attention (N,) with the registered ``method``; float32 (N,).

    Raises:
        ConfigError: ``method`` is not registered.
        ValueError: ``raw`` is not 1-D or holds non-finite values.
    """
    if method not in ATTENTION_NORMS:
        raise ConfigError(f"unknown attention normalisation {method!r}; choose from {sorted(ATTENTION_NORMS)}")
    a = np.asarray(raw, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"attention must be (N,), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention holds NaN or inf; the model output is broken")
    return ATTENTION_NORMS[method](a).astype(np.float32)


def attention_grid(grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """Per-tile ``values`` (N,) on the (rows, cols) tile grid, float32, NaN off tissue."""
    return grid.to_grid(np.asarray(values, dtype=np.float32))


def grid_sidecar(grid: TileGrid, norm: str) -> dict[str, object]:
    """Self-description of an attention grid: where cell (r, c) lies in level-0 pixels.

    Cell (r, c) is the tile whose level-0 top-left is ``origin + (c, r) * stride_level0``.
    """
    return {
        "layout": "array[row, col]; cell (r, c) has level-0 top-left (x, y) = origin + (c, r) * stride_level0",
        "origin_level0": [0, 0],
        "stride_level0": int(grid.stride_level0),
        "patch_size_level0": int(grid.patch_size_level0),
        "shape": [int(grid.shape[0]), int(grid.shape[1])],
        "slide_mpp": float(grid.slide_mpp),
        "level0_size": [int(grid.level0_size[0]), int(grid.level0_size[1])],
        "n_tiles": len(grid),
        "attention_norm": norm,
        "fill": "NaN off tissue",
    }


def _spans(start: np.ndarray, stop: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixels [a, b) whose centres lie in [start, stop); at least one pixel, clipped to [0, n)."""
    a = np.clip(np.ceil(start - 0.5), 0, n - 1).astype(np.int64)
    b = np.clip(np.ceil(stop - 0.5), 0, n).astype(np.int64)
    return a, np.maximum(b, a + 1)


def overlap_heatmap(level0_size: tuple[int, int], coords: np.ndarray, size_level0: int,
                    values: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Mean of the values of all tiles covering each pixel of an (h, w) map of the slide; NaN if none.

    A tile covers the output pixels whose centres lie in its level-0 footprint scaled to
    ``out_shape`` (a tile smaller than a pixel still covers one). Sums and counts are accumulated
    with difference images and two cumulative sums: O(N + h*w), no per-tile loop.

    Args:
        level0_size: slide (width, height) in level-0 pixels.
        coords: (N, 2) level-0 top-left (x, y) of the tiles.
        size_level0: tile side in level-0 pixels.
        values: (N,) per-tile values (e.g. raw attention of an overlapping grid).
        out_shape: (h, w) of the map.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64)
    assert values.shape == (len(coords),), f"values must be ({len(coords)},), got {values.shape}"
    h, w = int(out_shape[0]), int(out_shape[1])
    sx, sy = w / level0_size[0], h / level0_size[1]
    c0, c1 = _spans(coords[:, 0] * sx, (coords[:, 0] + size_level0) * sx, w)
    r0, r1 = _spans(coords[:, 1] * sy, (coords[:, 1] + size_level0) * sy, h)
    corners = np.concatenate([r0 * (w + 1) + c0, r0 * (w + 1) + c1, r1 * (w + 1) + c0, r1 * (w + 1) + c1])
    signs = np.repeat([1.0, -1.0, -1.0, 1.0], len(coords))
    size = (h + 1) * (w + 1)

    def accumulate(weights: np.ndarray) -> np.ndarray:
        diff = np.bincount(corners, weights=weights, minlength=size).reshape(h + 1, w + 1)
        return diff.cumsum(0).cumsum(1)[:h, :w]

    counts = np.rint(accumulate(signs))
    sums = accumulate(signs * np.tile(values, 4))
    out = np.full((h, w), np.nan, dtype=np.float32)
    covered = counts > 0
    out[covered] = sums[covered] / counts[covered]
    return out


def grid_to_pixels(grid: TileGrid, grid_values: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Sample a (rows, cols) grid map at the centres of an (h, w) image of the whole slide.

    Exact alignment (unlike a plain resize, which stretches the grid over the uncovered right and
    bottom margins): pixel centre -> level-0 point -> the cell whose tile starts last before it;
    NaN outside every tile.
    """
    assert grid_values.shape == grid.shape, f"grid map must be {grid.shape}, got {grid_values.shape}"
    h, w = int(out_shape[0]), int(out_shape[1])
    rows, cols = grid.shape
    if rows == 0 or cols == 0:
        return np.full((h, w), np.nan, dtype=np.float32)
    x = (np.arange(w) + 0.5) * grid.level0_size[0] / w
    y = (np.arange(h) + 0.5) * grid.level0_size[1] / h
    stride, size = grid.stride_level0, grid.patch_size_level0
    col, row = np.minimum(x // stride, cols - 1).astype(np.int64), np.minimum(y // stride, rows - 1).astype(np.int64)
    out = grid_values.astype(np.float32)[row[:, None], col[None, :]]
    out[~(y < row * stride + size), :] = np.nan
    out[:, ~(x < col * stride + size)] = np.nan
    return out


def _to_thumbnail(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    assert values.ndim == 2, f"values must be a 2-D map, got shape {values.shape}"
    if values.shape == shape:
        return values
    return cv2.resize(values, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def _value_range(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    return lo, hi if hi > lo else lo + 1.0


def blend(thumbnail_rgb: np.ndarray, values: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
          tissue_only: bool = True, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour-mapped ``values`` (h, w) alpha-blended on the thumbnail; returns (h, w, 3) uint8.

    With ``tissue_only`` NaN pixels keep the plain thumbnail; without it NaN is coloured as ``vmin``.
    """
    lo, hi = _value_range(values, vmin, vmax)
    on = np.isfinite(values) if tissue_only else np.ones(values.shape, bool)
    idx = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    mixed = cv2.addWeighted(thumbnail_rgb, 1.0 - alpha, _lut(cmap)[idx], alpha, 0.0)
    return np.where(on[..., None], mixed, thumbnail_rgb)


def _render(fig: object, height: int, width: int) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # type: ignore[arg-type]
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), 255, np.uint8)  # guard against off-by-one figure sizes
    out[:min(height, rgb.shape[0]), :min(width, rgb.shape[1])] = rgb[:height, :width]
    return out


def _title_strip(title: str, width: int) -> np.ndarray:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, TITLE_PX / 100), dpi=100, facecolor="white")
    fig.text(0.5, 0.5, title, ha="center", va="center", fontsize=11)
    return _render(fig, TITLE_PX, width)


def _colorbar_strip(height: int, cmap: str, lo: float, hi: float, label: str) -> np.ndarray:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(COLORBAR_PX / 100, height / 100), dpi=100, facecolor="white")
    margin = min(0.45, 12.0 / height)
    cax = fig.add_axes((0.12, margin, 0.16, 1.0 - 2 * margin))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=cmap), cax=cax)
    fontsize = float(np.clip(height / 45.0, 5, 9))
    bar.ax.tick_params(labelsize=fontsize)
    bar.set_label(label, fontsize=fontsize)
    return _render(fig, height, COLORBAR_PX)


def prime_renderer() -> None:
    """Render a tiny overlay once: matplotlib's imports and font cache cost a first call about 0.5 s."""
    overlay_png(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan), "")


def overlay_png(thumbnail_rgb: np.ndarray, values: np.ndarray, title: str, cmap: str = "jet",
                alpha: float = 0.5, tissue_only: bool = True, label: str = "attention",
                vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Heatmap overlay with title and colour bar, as an RGB uint8 image for ``write_png``.

    Args:
        thumbnail_rgb: (h, w, 3) uint8 thumbnail of the whole slide.
        values: 2-D map (NaN off tissue); resized to (h, w) with nearest neighbour if its shape
            differs (use ``grid_to_pixels`` for an exactly aligned tile grid).
        title: text of the title strip (e.g. predicted class and probability).
        cmap: matplotlib colormap name.
        alpha: weight of the colour on tissue.
        tissue_only: blend only where ``values`` is finite.
        label: colour-bar label, e.g. ``"attention (percentile)"``.
        vmin, vmax: colour range; default the finite range of ``values``.

    Returns:
        (TITLE_PX + h, w + COLORBAR_PX, 3) uint8; ``[TITLE_PX:, :w]`` is the blended thumbnail.
    """
    thumbnail_rgb = np.asarray(thumbnail_rgb)
    assert thumbnail_rgb.ndim == 3 and thumbnail_rgb.shape[2] == 3 and thumbnail_rgb.dtype == np.uint8, \
        f"thumbnail must be (h, w, 3) uint8, got {thumbnail_rgb.shape} {thumbnail_rgb.dtype}"
    h, w = thumbnail_rgb.shape[:2]
    vals = _to_thumbnail(values, (h, w))
    lo, hi = _value_range(vals, vmin, vmax)
    out = np.full((TITLE_PX + h, w + COLORBAR_PX, 3), 255, np.uint8)
    out[:TITLE_PX] = _title_strip(title, w + COLORBAR_PX)
    out[TITLE_PX:, :w] = blend(thumbnail_rgb, vals, cmap, alpha, tissue_only, lo, hi)
    out[TITLE_PX:, w:] = _colorbar_strip(h, cmap, lo, hi, label)
    return out
