"""Coords and features h5 files (loadable by CLAM and TRIDENT loaders); the contract is docs/formats.md.

Layout: dataset ``coords`` int64 (N, 2) with the tiling attributes, optional dataset ``features``
float32 (N, D) with ``encoder`` and ``name``, root attribute ``slidemil_schema``. Both are chunked
by several hundred rows. Files are written to a temporary name and renamed; reading validates and
turns a truncated or foreign file into a ``StoreError`` that says what to do. :func:`check_h5`
lists every way a file departs from the contract (``slidemil check``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import StoreError
from slidemil.slide.grid import TileGrid, TileSpec

SCHEMA_VERSION = 1
CHUNK_ROWS = 512


@dataclass(frozen=True)
class CoordsAttrs:
    """Attributes of the ``coords`` dataset (names and meaning shared with CLAM and TRIDENT)."""

    patch_size: int
    patch_size_level0: int
    patch_level: int
    level0_magnification: float
    target_magnification: float
    overlap: int
    level0_width: int
    level0_height: int
    mpp: float
    slide_mpp: float
    name: str
    stride_level0: int = 0

    @classmethod
    def for_grid(cls, grid: TileGrid, spec: TileSpec, slide_id: str, magnification: float | None) -> CoordsAttrs:
        """Attributes describing ``grid``; magnifications from mpp (10 / mpp) where the slide has none."""
        level0_mag = magnification if magnification else round(10.0 / grid.slide_mpp, 2)
        return cls(patch_size=spec.patch_size, patch_size_level0=grid.patch_size_level0, patch_level=0,
                   level0_magnification=float(level0_mag), target_magnification=round(10.0 / spec.mpp, 2),
                   overlap=spec.overlap, level0_width=grid.level0_size[0], level0_height=grid.level0_size[1],
                   mpp=spec.mpp, slide_mpp=grid.slide_mpp, name=slide_id, stride_level0=grid.stride_level0)

    @classmethod
    def from_h5(cls, attrs: Any, path: Path) -> CoordsAttrs:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in attrs and n != "stride_level0"]
        if missing:
            raise StoreError(f"{path}: coords lack attributes {missing}; re-run `slidemil tile` for this slide")
        values = {n: attrs[n] for n in names if n in attrs}
        values = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
                  for k, v in values.items()}
        if not values.get("stride_level0"):
            psize, overlap = values["patch_size"], values["overlap"]
            values["stride_level0"] = round(values["patch_size_level0"] * (psize - overlap) / psize)
        return cls(**values)


@dataclass(frozen=True)
class FeatureBag:
    """One slide's stored tiles: coords, their attributes, and features when present."""

    coords: np.ndarray  # int64 (N, 2)
    attrs: CoordsAttrs
    features: np.ndarray | None = None  # float32 (N, D)
    encoder: str | None = None
    feature_attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _chunks(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (max(1, min(CHUNK_ROWS, n_rows)) if n_rows else CHUNK_ROWS, n_cols)


def write_h5(path: str | Path, coords: np.ndarray, attrs: CoordsAttrs, features: np.ndarray | None = None,
             encoder: str | None = None, feature_attrs: dict[str, Any] | None = None) -> None:
    """Write a coords (and optionally features) file atomically."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["slidemil_schema"] = SCHEMA_VERSION
        ds = f.create_dataset("coords", data=coords, chunks=_chunks(len(coords), 2), maxshape=(None, 2))
        for key, value in dataclasses.asdict(attrs).items():
            ds.attrs[key] = value
        if features is not None:
            features = np.asarray(features, dtype=np.float32)
            assert features.ndim == 2 and len(features) == len(coords), \
                f"features {features.shape} do not match coords {coords.shape}"
            fds = f.create_dataset("features", data=features, chunks=_chunks(*features.shape),
                                   maxshape=(None, features.shape[1]))
            fds.attrs["encoder"] = encoder or "unknown"
            fds.attrs["name"] = attrs.name
            for key, value in (feature_attrs or {}).items():
                fds.attrs[key] = value


def read_h5(path: str | Path, load_features: bool = True) -> FeatureBag:
    """Read and validate a coords or features file.

    Raises:
        StoreError: missing, truncated, or not a slidemil/CLAM/TRIDENT-style file.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise StoreError(f"{path}: no 'coords' dataset; not a slidemil coords/features file")
            cds = f["coords"]
            coords = np.asarray(cds[()], dtype=np.int64)
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise StoreError(f"{path}: coords have shape {coords.shape}, expected (N, 2)")
            attrs = CoordsAttrs.from_h5(cds.attrs, path)
            bag = FeatureBag(coords=coords, attrs=attrs)
            if "features" in f:
                fds = f["features"]
                feats = np.asarray(fds[()], dtype=np.float32) if load_features else None
                if fds.ndim != 2 or fds.shape[0] != len(coords):
                    raise StoreError(f"{path}: features {fds.shape} do not match coords {coords.shape}")
                fattrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fds.attrs.items()}
                bag = dataclasses.replace(bag, features=feats, encoder=str(fattrs.get("encoder", "unknown")),
                                          feature_attrs=fattrs)
            return bag
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{path}: unreadable h5 file ({exc}); it is truncated or corrupt: delete it and "
                         "re-run the step that wrote it") from exc


REQUIRED_COORD_ATTRS = tuple(f.name for f in dataclasses.fields(CoordsAttrs) if f.name != "stride_level0")
REQUIRED_FEATURE_ATTRS = ("encoder", "name")
MIN_CHUNK_ROWS = 64


def check_h5(path: str | Path) -> list[str]:
    """Every way ``path`` departs from the coords/features contract (docs/formats.md); [] when it holds.

    Checks dtypes and shapes, the attributes CLAM- and TRIDENT-style loaders read, chunking, the schema
    attribute, finite features, and tiles inside the slide. Never raises for a bad file: an unreadable
    file is one problem.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return _coords_problems(f, path) + _features_problems(f)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return [f"unreadable h5 file ({exc}): truncated or not HDF5; delete it and re-run the step that wrote it"]


def _coords_problems(f: h5py.File, path: Path) -> list[str]:
    if "coords" not in f:
        return ["no 'coords' dataset: not a coords/features file"]
    c = f["coords"]
    problems = []
    if c.dtype != np.int64 or c.ndim != 2 or c.shape[1] != 2:
        problems.append(f"coords is {c.dtype} {c.shape}, expected int64 (N, 2)")
    missing = [a for a in REQUIRED_COORD_ATTRS if a not in c.attrs]
    if missing:
        problems.append(f"coords lack attribute(s) {missing}")
    if c.shape[0] >= MIN_CHUNK_ROWS and (not c.chunks or c.chunks[0] < MIN_CHUNK_ROWS):
        problems.append(f"coords chunked by {c.chunks[0] if c.chunks else 'none'} rows; use several hundred")
    if "slidemil_schema" not in f.attrs:
        problems.append("root lacks attribute 'slidemil_schema'")
    elif int(f.attrs["slidemil_schema"]) != SCHEMA_VERSION:
        problems.append(f"slidemil_schema {f.attrs['slidemil_schema']} is not {SCHEMA_VERSION}")
    if missing or problems or c.shape[0] == 0:
        return problems
    try:
        attrs = CoordsAttrs.from_h5(c.attrs, path)
    except (StoreError, TypeError, ValueError) as exc:
        return [f"coords attributes do not parse: {exc}"]
    xy = np.asarray(c[()])
    size = attrs.patch_size_level0
    outside = (xy < 0).any(axis=1) | (xy[:, 0] + size > attrs.level0_width) | (xy[:, 1] + size > attrs.level0_height)
    if outside.any():
        problems.append(f"{int(outside.sum())} tile(s) reach outside the {attrs.level0_width} x {attrs.level0_height} "
                        f"slide (first at {xy[outside][0].tolist()})")
    if len(np.unique(xy, axis=0)) != len(xy):
        problems.append("coords hold duplicate tiles")
    return problems


def _features_problems(f: h5py.File) -> list[str]:
    if "features" not in f:
        return []
    x = f["features"]
    n = f["coords"].shape[0] if "coords" in f else None
    problems = []
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] != n:
        problems.append(f"features is {x.dtype} {x.shape}, expected float32 ({n}, D)")
    missing = [a for a in REQUIRED_FEATURE_ATTRS if a not in x.attrs]
    if missing:
        problems.append(f"features lack attribute(s) {missing}")
    if x.shape[0] >= MIN_CHUNK_ROWS and (not x.chunks or x.chunks[0] < MIN_CHUNK_ROWS):
        problems.append(f"features chunked by {x.chunks[0] if x.chunks else 'none'} rows; use several hundred")
    if not problems and x.size:
        bad = sum(int((~np.isfinite(x[i:i + CHUNK_ROWS])).any(axis=1).sum()) for i in range(0, x.shape[0], CHUNK_ROWS))
        if bad:
            problems.append(f"{bad} feature row(s) hold NaN or infinity")
    return problems


def is_complete(path: str | Path, need_features: bool = False) -> bool:
    """Whether ``path`` exists and reads as a valid file (with features when asked)."""
    try:
        bag = read_h5(path, load_features=False)
    except StoreError:
        return False
    return bag.encoder is not None or not need_features
