"""Label tables, bag datasets, padding collate and epoch samplers.

A *bag* is one slide: its instances (tile features (N, D) here; uint8 tiles (N, H, W, 3) for end-to-end
training) and its label. Datasets return :class:`Bag`; :func:`collate_bags` pads bags to a batch
with a mask. Every random draw (sampling order, tile subsets) is a function of the seed, the epoch
and the slide index, so runs are reproducible, resumable, and the same whatever the number of
worker processes or ranks. The training sampler yields ``(index, epoch)`` keys, so that persistent
DataLoader workers draw the right epoch's tiles without being told.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from slidemil.artifacts.features_folder import FeaturesFolder
from slidemil.errors import LabelTableError
from slidemil.trainer.splits import SPLIT_NAMES

log = logging.getLogger(__name__)

MAX_LISTED = 8  # ids shown per problem in a LabelTableError


# --- label table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelTable:
    """A validated slide table: ``slide_id`` (index), ``label`` (int), optional patient_id, split."""

    table: pd.DataFrame
    class_names: tuple[str, ...]

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(dtype=np.int64)


def _listed(ids: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:MAX_LISTED])
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > MAX_LISTED else "")


def raise_problems(problems: Sequence[str], source: str) -> None:
    """Raise one LabelTableError listing every problem (nothing when there is none)."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LabelTableError(f"{source}: {len(problems)} problem(s) to fix before training:\n{lines}")


def read_label_table(path: str | Path, class_names: Sequence[str] = ()) -> tuple[LabelTable, list[str]]:
    """Read ``slide_id,label[,patient_id][,split]`` and collect (not raise) what is wrong with it.

    Labels are class indices when every label is an integer, else class names. ``class_names``
    gives the order and display names; without it, names are the sorted label names (or
    ``"0".."C-1"`` for integer labels, with C = largest label + 1).

    Returns:
        The table (rows with unusable ids or labels dropped) and the list of problems found.

    Raises:
        LabelTableError: the file cannot be read or lacks the slide_id or label column.
    """
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "split": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise LabelTableError(f"cannot read the label table {path}: {exc}") from exc
    missing = [c for c in ("slide_id", "label") if c not in df.columns]
    if missing:
        raise LabelTableError(f"{path}: no column(s) {missing}; expected slide_id,label[,patient_id][,split], "
                              f"found {list(df.columns)}")
    problems: list[str] = []
    df["slide_id"] = df["slide_id"].str.strip()
    bad_id = df["slide_id"].isna() | (df["slide_id"] == "") | df["slide_id"].str.contains(r"[/\\]", na=False)
    if bad_id.any():
        problems.append(f"unknown slide id(s) (empty, or with a path separator) in row(s) "
                        f"{_listed((np.flatnonzero(bad_id) + 2).tolist())}")
    df = df[~bad_id]
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        problems.append(f"duplicated slide id(s): {_listed(dup)}")
    df = df.drop_duplicates("slide_id").set_index("slide_id")
    labels, names = _parse_labels(df["label"], tuple(class_names), problems)
    df = df.loc[labels.index].assign(label=labels.astype(np.int64))
    if "split" in df.columns:
        _check_split_column(df, problems)
    return LabelTable(df, names), problems


def _parse_labels(raw: pd.Series, class_names: tuple[str, ...], problems: list[str]) -> tuple[pd.Series, tuple]:
    """Integer labels (slides with unusable labels dropped) and the class names."""
    empty = raw.isna()
    if empty.any():
        problems.append(f"slide(s) without a label: {_listed(raw.index[empty].tolist())}")
    raw = raw[~empty]
    as_num = pd.to_numeric(raw, errors="coerce")
    if as_num.notna().all() and (as_num % 1 == 0).all():
        labels = as_num.astype(np.int64)
        n_classes = len(class_names) or (int(labels.max()) + 1 if len(labels) else 0)
        names = class_names or tuple(str(i) for i in range(n_classes))
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            problems.append(f"label(s) out of range [0, {n_classes}) for slide(s) "
                            f"{_listed([f'{s}={v}' for s, v in labels[bad].items()])}")
    else:
        text = raw.astype(str).str.strip()
        names = class_names or tuple(sorted(text.unique()))
        index = {n: i for i, n in enumerate(names)}
        bad = ~text.isin(list(index))
        if bad.any():
            problems.append(f"unknown class name(s) {sorted(text[bad].unique())[:MAX_LISTED]} for slide(s) "
                            f"{_listed(text.index[bad].tolist())}; class names are {list(names)}")
        labels = text.map(index)
    return labels[~bad], tuple(names)


def _check_split_column(df: pd.DataFrame, problems: list[str]) -> None:
    split = df["split"].astype(str).str.strip().str.lower()
    bad = ~split.isin(SPLIT_NAMES)
    if bad.any():
        problems.append(f"split value(s) {sorted(df['split'][bad].astype(str).unique())[:MAX_LISTED]} are not "
                        f"one of {list(SPLIT_NAMES)} (slide(s) {_listed(df.index[bad].tolist())})")
    df["split"] = split


def check_classes(table: LabelTable, problems: list[str], where: str = "the table") -> None:
    """Add a problem for each class without any slide (and for fewer than two classes)."""
    if len(table.class_names) < 2:
        problems.append(f"{where} has a single class {list(table.class_names)}; a classifier needs at least two "
                        "(give --class-names to name the others)")
        return
    counts = np.bincount(table.labels, minlength=len(table.class_names))
    empty = [table.class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        problems.append(f"class(es) {empty} have no slide in {where} (class names: {list(table.class_names)}; "
                        "give --class-names to fix the class list)")


# --- feature files -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureIndex:
    """What validation learned about each slide's feature file."""

    paths: dict[str, Path]
    n_tiles: dict[str, int]
    feature_dim: int


def check_feature_files(slide_ids: Sequence[str], folder: FeaturesFolder, skip_missing: bool,
                        expected_sha256: str | None, problems: list[str]) -> FeatureIndex:
    """Look at every slide's feature file (attributes and shapes, not the data).

    Missing, unreadable, empty and foreign files are problems, or dropped with a warning when
    ``skip_missing``; feature widths that disagree are always a problem.
    """
    from slidemil.errors import StoreError
    from slidemil.slide.store import read_h5

    bad: dict[str, list[str]] = {"missing": [], "unreadable": [], "without features": [], "empty": [],
                                 "from another backbone": []}
    paths, n_tiles, dims = {}, {}, {}
    for sid in slide_ids:
        path = folder.feature_file(sid)
        if not path.is_file():
            bad["missing"].append(sid)
            continue
        try:
            bag = read_h5(path, load_features=False)
        except StoreError as exc:
            bad["unreadable"].append(f"{sid} ({exc.__cause__ or exc})")
            continue
        sha = bag.feature_attrs.get("weights_sha256")
        if bag.encoder is None:
            bad["without features"].append(sid)
        elif len(bag.coords) == 0:
            bad["empty"].append(sid)
        elif expected_sha256 and sha and str(sha) != expected_sha256:
            bad["from another backbone"].append(sid)
        else:
            with h5py.File(path, "r") as f:
                dims[sid] = int(f["features"].shape[1])
            paths[sid], n_tiles[sid] = path, len(bag.coords)
    _report_feature_problems(bad, folder.h5, skip_missing, problems)
    by_dim = pd.Series(dims, dtype=np.int64)
    if by_dim.nunique() > 1:
        groups = {int(d): _listed(by_dim.index[by_dim == d].tolist()) for d in sorted(by_dim.unique())}
        problems.append(f"feature dimensions disagree between slides: {groups}; extract all slides with one backbone")
    return FeatureIndex(paths, n_tiles, int(by_dim.iloc[0]) if len(by_dim) else 0)


def _report_feature_problems(bad: dict[str, list[str]], features_dir: Path, skip_missing: bool,
                             problems: list[str]) -> None:
    hints = {"missing": f"looked for {features_dir}/features/<slide_id>.h5",
             "unreadable": "delete them and re-run `slidemil extract`",
             "without features": "these are coords files; run `slidemil extract`",
             "empty": "no tissue tile; drop them from the table",
             "from another backbone": "their weights_sha256 differs from backbone/backbone_card.json"}
    for kind, ids in bad.items():
        if not ids:
            continue
        text = f"{len(ids)} slide(s) with {kind} feature file(s): {_listed(ids)} ({hints[kind]})"
        if skip_missing and kind != "from another backbone":
            log.warning("--skip-missing: dropping %s", text)
        else:
            problems.append(text + ("" if kind == "from another backbone" else "; or pass --skip-missing"))


# --- datasets ------------------------------------------------------------------------------------

class Bag(NamedTuple):
    """One slide as the model sees it."""

    inputs: torch.Tensor  # (N, ...) instance inputs: features (N, D), or uint8 tiles (N, H, W, 3)
    label: int
    position: int  # of the slide in its dataset


class BagBatch(NamedTuple):
    """B bags padded to the longest one."""

    inputs: torch.Tensor  # (B, N, ...) zero-padded
    mask: torch.Tensor  # bool (B, N), True for real instances
    labels: torch.Tensor  # int64 (B,)
    indices: torch.Tensor  # int64 (B,) dataset positions

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        return BagBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> BagBatch:
        return BagBatch(*(t.pin_memory() for t in self))


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pad bags of different sizes along the instance axis; the mask marks real instances."""
    assert bags, "empty batch"
    longest = max(len(b.inputs) for b in bags)
    first = bags[0].inputs
    inputs = first.new_zeros((len(bags), longest, *first.shape[1:]))
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        inputs[i, : len(bag.inputs)] = bag.inputs
        mask[i, : len(bag.inputs)] = True
    labels = torch.tensor([b.label for b in bags], dtype=torch.int64)
    indices = torch.tensor([b.position for b in bags], dtype=torch.int64)
    return BagBatch(inputs, mask, labels, indices)


class BagDataset(Dataset[Bag]):
    """Slides with labels. ``self[i]`` or ``self[(i, epoch)]`` is a :class:`Bag`; subclasses
    implement :meth:`bag`. Without an epoch in the key, draws are those of epoch 0 (evaluation)."""

    def __init__(self, slide_ids: Sequence[str], labels: np.ndarray, seed: int = 0) -> None:
        assert len(slide_ids) == len(labels), (len(slide_ids), len(labels))
        self.slide_ids = list(slide_ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed = seed

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of slide ``index`` in ``epoch`` (the same in any worker or rank)."""
        return np.random.default_rng([self.seed, epoch, index])

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> Bag:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.bag(int(index), int(epoch))

    def bag(self, index: int, epoch: int) -> Bag:
        raise NotImplementedError


def subsample(n: int, max_patches: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of ``max_patches`` of ``n`` instances drawn without replacement; None: all."""
    if max_patches is None or n <= max_patches:
        return None
    return np.sort(rng.choice(n, size=max_patches, replace=False))


class FeatureBagDataset(BagDataset):
    """Bags of precomputed features: whole h5 datasets read at once, optionally cached in memory.

    Args:
        paths: one features file per slide.
        labels: (S,) class indices.
        max_patches: tiles drawn per bag and pass (None: all, as at evaluation).
        seed: seed of the tile draws.
        cache: keep bags in memory once read (use with ``workers=0`` or :meth:`preload`).
    """

    def __init__(self, slide_ids: Sequence[str], paths: Sequence[Path], labels: np.ndarray,
                 max_patches: int | None = None, seed: int = 0, cache: bool = False) -> None:
        super().__init__(slide_ids, labels, seed)
        self.paths = [Path(p) for p in paths]
        self.max_patches = max_patches
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def read(self, index: int) -> torch.Tensor:
        """All features of slide ``index``, float32 (N, D)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        with h5py.File(self.paths[index], "r") as f:
            feats = torch.from_numpy(np.asarray(f["features"][()], dtype=np.float32))
        if self.cache is not None:
            self.cache[index] = feats
        return feats

    def preload(self) -> None:
        """Read every bag into the cache (call in the main process before workers fork)."""
        if self.cache is None:
            self.cache = {}
        for i in range(len(self)):
            self.read(i)

    def bag(self, index: int, epoch: int) -> Bag:
        feats = self.read(index)
        keep = subsample(len(feats), self.max_patches, self.rng(index, epoch))
        if keep is not None:
            feats = feats[torch.from_numpy(keep)]
        return Bag(feats, int(self.labels[index]), index)


# --- sampling ------------------------------------------------------------------------------------

class EpochSampler(Sampler[tuple[int, int]]):
    """Training order of one rank: a seeded permutation (or class-balanced draw) per epoch.

    Yields ``(index, epoch)`` dataset keys.

    All ranks draw the same order and take every ``world``-th element, so the bags of step s over
    all ranks are exactly the bags of step s of a single process with a ``world`` times larger
    batch. The order is padded (by wrapping) to a multiple of ``world``.
    """

    def __init__(self, n: int, seed: int = 0, weights: np.ndarray | None = None, rank: int = 0,
                 world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """The order of all ranks for this epoch, padded to a multiple of ``world``."""
        rng = np.random.default_rng([self.seed, 1_000_003, self.epoch])
        if self.weights is None:
            order = rng.permutation(self.n)
        else:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights / self.weights.sum())
        total = math.ceil(self.n / self.world) * self.world
        return np.resize(order, total)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self.order()[self.rank :: self.world].tolist()])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)
