"""Writers of the scoring outputs; each file (and the top-k folder) appears complete or not at all.

Layout under the output folder::

    predictions.csv, predictions.json     one row per slide (PredictionsTable)
    run_summary.json                      batch figures (write_run_summary)
    heatmaps/<id>.npy, .json, .png        attention grid, its sidecar, the overlay (write_heatmap)
    heatmaps/<id>.overlap.npy             optional smoother map (--heatmap-overlap)
    heatmaps/<id>.class_<name>.npy, ...   one map per class, for heads that have them (write_class_heatmaps)
    geojson/<id>.geojson                  one QuPath tile per tile (geojson_tiles, write_geojson)
    topk/<id>/rankNN_x<x>_y<y>.png        most attended tiles, rank01 highest, and index.csv
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.atomic import TMP_MARK, atomic_path, temporary_dir, write_json
from slidemil.engine.heatmap import attention_grid, grid_sidecar, grid_to_pixels, overlay_png
from slidemil.jobs import ResultsTable
from slidemil.slide.grid import TileGrid
from slidemil.slide.tiling import write_png

TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def slide_paths(out_dir: str | Path, slide_id: str) -> dict[str, Path]:
    """Where each per-slide output of ``slide_id`` lives."""
    out = Path(out_dir)
    return {"npy": out / "heatmaps" / f"{slide_id}.npy", "sidecar": out / "heatmaps" / f"{slide_id}.json",
            "png": out / "heatmaps" / f"{slide_id}.png", "overlap": out / "heatmaps" / f"{slide_id}.overlap.npy",
            "geojson": out / "geojson" / f"{slide_id}.geojson", "topk": out / "topk" / slide_id}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_heatmap(out_dir: str | Path, slide_id: str, grid: TileGrid, values: np.ndarray, norm: str,
                  thumbnail: np.ndarray, title: str, overlap_map: np.ndarray | None = None,
                  cmap: str = "jet", alpha: float = 0.5) -> dict[str, Path]:
    """Write ``heatmaps/<id>.npy`` (float32 grid, NaN off tissue), its ``.json`` sidecar and ``.png``.

    Args:
        out_dir: output folder of the run.
        slide_id: the slide's id.
        grid: the slide's tile grid.
        values: (N,) normalised attention of the grid's tiles.
        norm: name of the normalisation, recorded in the sidecar and the colour-bar label.
        thumbnail: (h, w, 3) uint8 thumbnail of the whole slide.
        title: overlay title (predicted class and probability).
        overlap_map: optional 2-D map of the whole slide (``overlap_heatmap``); when given it is
            drawn instead of the grid and saved as ``heatmaps/<id>.overlap.npy``.
        cmap: colormap name.
        alpha: colour weight on tissue.

    Returns:
        The paths written.
    """
    paths = slide_paths(out_dir, slide_id)
    grid_map = attention_grid(grid, values)  # (rows, cols) float32
    sidecar = grid_sidecar(grid, norm)
    h, w = thumbnail.shape[:2]
    shown = grid_to_pixels(grid, grid_map, (h, w))
    written = {k: paths[k] for k in ("npy", "sidecar", "png")}
    if overlap_map is not None:
        _save_npy(paths["overlap"], np.asarray(overlap_map, dtype=np.float32))
        sidecar["overlap_map"] = {"file": paths["overlap"].name, "shape": list(np.shape(overlap_map)),
                                  "covers": "whole slide, level0_size scaled to shape"}
        shown, written["overlap"] = np.asarray(overlap_map, dtype=np.float32), paths["overlap"]
    _save_npy(paths["npy"], grid_map)
    write_json(paths["sidecar"], sidecar)
    write_png(paths["png"], overlay_png(thumbnail, shown, title, cmap=cmap, alpha=alpha,
                                        label=f"attention ({norm})"))
    return written


def class_map_id(slide_id: str, class_name: str) -> str:
    """The file stem of a slide's map for one class: ``<id>.class_<name>`` (characters other than letters,
    digits, ``.``, ``-`` and ``_`` in the name become ``_``)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(class_name))
    return f"{slide_id}.class_{safe}"


def write_class_heatmaps(out_dir: str | Path, slide_id: str, grid: TileGrid, per_class: np.ndarray, norm: str,
                         thumbnail: np.ndarray, class_names: list[str], probabilities: np.ndarray) -> list[Path]:
    """One heatmap per class (heads with one attention map per class, e.g. CLAM-MB, DSMIL):
    ``heatmaps/<id>.class_<name>.npy``, ``.json`` and ``.png``, laid out as :func:`write_heatmap`'s.

    Args:
        per_class: (C, N) normalised attention of each class's map.
        probabilities: (C,) the slide's probabilities (in each title).
    """
    written: list[Path] = []
    for c, name in enumerate(class_names):
        title = f"{slide_id}: attention for {name} (p = {float(probabilities[c]):.3f})"
        paths = write_heatmap(out_dir, class_map_id(slide_id, name), grid, per_class[c], norm, thumbnail, title)
        written += list(paths.values())
    return written


def _number(v: Any) -> float | None:
    """A JSON number, or None for NaN/inf (JSON has no NaN)."""
    f = float(v)
    return f if math.isfinite(f) else None


def _numbers(values: np.ndarray) -> list[float | None]:
    """(N,) as a list of JSON numbers, None where not finite; float32 keeps its short form (0.3)."""
    a = np.asarray(values)
    if a.dtype == np.float32:  # via str: 0.3 rather than float64's 0.30000001192092896
        out: list[float | None] = [float(v) for v in a.astype(str).tolist()]
    else:
        out = a.astype(np.float64).tolist()
    if not np.isfinite(a).all():
        for i in np.flatnonzero(~np.isfinite(a)).tolist():
            out[i] = None
    return out


def _classification(name: str, class_names: list[str]) -> dict[str, Any]:
    index = class_names.index(name) if name in class_names else 0
    return {"name": name, "color": list(TAB10[index % len(TAB10)])}


def geojson_tiles(grid: TileGrid, attention: np.ndarray, norm: str, class_names: list[str],
                  probabilities: np.ndarray, extra: dict[str, np.ndarray] | None = None,
                  classification: str | None = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one QuPath tile per grid tile, in level-0 pixels.

    Each Feature: Polygon of the tile square (closed ring of 5 [x, y] positions, counter-clockwise
    with y up), ``properties.objectType == "tile"``, ``name == "tile i"``, ``measurements`` with
    ``attention`` (normalised by ``norm``), each ``extra`` per-tile array under its key (e.g.
    ``attention_raw``) and ``prob_<class>`` for the slide's probabilities. Non-finite numbers are
    written as null. The collection carries a ``slidemil`` foreign member naming the normalisation.

    Args:
        grid: the slide's tile grid.
        attention: (N,) normalised attention.
        norm: normalisation name.
        class_names: (C,) class names.
        probabilities: (C,) slide-level class probabilities.
        extra: more per-tile measurements, each (N,).
        classification: optional class name set as every tile's QuPath classification.
    """
    n = len(grid)
    attention = np.asarray(attention)
    probabilities = np.asarray(probabilities).reshape(-1)
    assert attention.shape == (n,), f"attention must be ({n},), got {attention.shape}"
    assert probabilities.shape == (len(class_names),), "one probability per class"
    columns = {"attention": attention, **(extra or {})}
    for key, col in columns.items():
        assert np.shape(col) == (n,), f"measurement {key} must be ({n},), got {np.shape(col)}"
    per_tile = {k: _numbers(c) for k, c in columns.items()}
    slide_level = {f"prob_{c}": _number(p) for c, p in zip(class_names, probabilities.tolist())}
    cls = _classification(classification, class_names) if classification is not None else None
    s = int(grid.patch_size_level0)
    keys = list(per_tile)
    features = []
    for i, ((x, y), *vals) in enumerate(zip(grid.coords.tolist(), *per_tile.values())):
        measurements = dict(zip(keys, vals))
        measurements.update(slide_level)
        props: dict[str, Any] = {"objectType": "tile", "name": f"tile {i}", "measurements": measurements}
        if cls is not None:
            props["classification"] = cls
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": props})
    meta = {"attention_norm": norm, "coordinates": "level-0 pixels", "patch_size_level0": s,
            "slide_mpp": float(grid.slide_mpp), "class_names": list(class_names),
            "probabilities": [_number(p) for p in probabilities.tolist()]}
    return {"type": "FeatureCollection", "slidemil": meta, "features": features}


def write_geojson(path: str | Path, fc: dict[str, Any], chunk: int = 2000) -> None:
    """Write ``fc`` as compact JSON to ``path``, atomically, ``chunk`` features at a time.

    Each chunk goes through the C encoder (``json.dump`` would use the slow pure-Python one), so
    no whole-file string is built and 100k tiles take about a second.
    """
    head = {k: v for k, v in fc.items() if k != "features"}
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    features = fc.get("features", [])
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(head)[:-1] + ("," if head else "") + '"features":[')
        for start in range(0, len(features), chunk):
            f.write(("," if start else "") + ",".join(map(dumps, features[start:start + chunk])))
        f.write("]}")


def topk_indices(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most attended tiles, highest first (stable for ties)."""
    order = np.argsort(-np.asarray(attention, dtype=np.float64), kind="stable")
    return order[:max(0, k)]


def _remove_stale_dirs(parent: Path, slide_id: str) -> None:
    for p in parent.glob(f"{TMP_MARK}{slide_id}-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def write_topk(out_dir: str | Path, slide_id: str, tiles: np.ndarray, coords: np.ndarray,
               attention: np.ndarray) -> Path:
    """Write ``topk/<id>/rankNN_x<x>_y<y>.png`` (rank01 = most attended) and ``index.csv``.

    Tiles are ranked here by ``attention`` (descending). The folder is built under a temporary
    name beside it and renamed when complete; a previous folder is replaced.

    Args:
        out_dir: output folder of the run.
        slide_id: the slide's id.
        tiles: (K, H, W, 3) uint8 tiles.
        coords: (K, 2) level-0 top-left (x, y) of the tiles.
        attention: (K,) their attention (normalised as in the other outputs).
    """
    import cv2

    tiles, coords = np.asarray(tiles), np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64)
    assert tiles.ndim == 4 and tiles.shape[3] == 3 and tiles.dtype == np.uint8, f"tiles {tiles.shape} {tiles.dtype}"
    assert len(tiles) == len(coords) == len(attention), "tiles, coords and attention must have the same K"
    final = slide_paths(out_dir, slide_id)["topk"]
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dirs(final.parent, slide_id)
    tmp = temporary_dir(final)
    try:
        rows = []
        for rank, i in enumerate(topk_indices(attention, len(attention)).tolist(), start=1):
            x, y = coords[i].tolist()
            name = f"rank{rank:02d}_x{x}_y{y}.png"
            if not cv2.imwrite(str(tmp / name), cv2.cvtColor(tiles[i], cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {tmp / name}")
            rows.append({"rank": rank, "x": x, "y": y, "attention": float(attention[i]), "file": name})
        with open(tmp / "index.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["rank", "x", "y", "attention", "file"])
            writer.writeheader()
            writer.writerows(rows)
        _swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _swap_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is moved aside first, then deleted."""
    if final.exists():
        old = final.parent / f"{TMP_MARK}{final.name}-old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _clean(value: Any, text: bool = False) -> Any:
    """A plain JSON-able Python value: numpy scalars unwrapped, NaN -> None ('' for text)."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "" if text else None
    return value


def prediction_columns(class_names: list[str]) -> list[str]:
    """slide_id, status, error, pred_class, pred_index, ``prob_<class>`` per class, n_tiles, seconds, tiles_per_s."""
    return (["slide_id", "status", "error", "pred_class", "pred_index"] + [f"prob_{c}" for c in class_names]
            + ["n_tiles", "seconds", "tiles_per_s"])


class PredictionsTable(ResultsTable):
    """``predictions.csv`` (and ``predictions.json`` with the class names): the scoring job's results table.

    Columns: :func:`prediction_columns`, then any others rows bring (attention_norm, ensemble members'
    probabilities), sorted. Shards of one job append to it together (see :class:`slidemil.jobs.ResultsTable`).
    """

    def __init__(self, out_dir: str | Path, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        super().__init__(Path(out_dir) / "predictions.csv", prediction_columns(self.class_names),
                         json_path=Path(out_dir) / "predictions.json", json_extra={"class_names": self.class_names})


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return _clean(obj)


def write_run_summary(path: str | Path, **figures: Any) -> None:
    """Write the batch's figures (slides, failures, tiles/s, backend, ...) as JSON, atomically."""
    write_json(path, _finite(figures))


def outputs_complete(out_dir: str | Path, slide_id: str, want_geojson: bool = True, want_topk: int = 0,
                     want_overlap: bool = False) -> bool:
    """True when every output of ``slide_id`` that the run asks for exists (all are atomic)."""
    paths = slide_paths(out_dir, slide_id)
    needed = [paths["npy"], paths["sidecar"], paths["png"]]
    if want_geojson:
        needed.append(paths["geojson"])
    if want_topk > 0:
        needed.append(paths["topk"] / "index.csv")
    if want_overlap:
        needed.append(paths["overlap"])
    return all(p.is_file() for p in needed)
