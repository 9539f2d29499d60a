"""Patient-grouped, label-stratified train/val/test splits and k-fold cross-validation.

No patient ever has slides in two parts of a split: slides of one patient share tissue, staining
and scanner, and leaking them across parts inflates every metric. Slides without a patient id are
their own patient. Assignment is a deterministic greedy over patients (largest first, ties in a
seeded random order): each patient goes to the part whose per-class slide counts it brings closest
to their targets; a repair pass then gives every part at least one slide of each class when the
cohort has enough patients of that class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from slidemil.atomic import write_text
from slidemil.errors import ConfigError, LabelTableError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
_OWN_PATIENT = "__slide__"


def train_val_test_split(
    table: pd.DataFrame,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    label_col: str = "label",
    group_col: str = "patient_id",
) -> pd.Series:
    """Split slides into "train", "val" and "test", grouped by patient and stratified by label.

    Args:
        table: one row per slide, with a unique index (slide ids, ideally).
        fractions: share of slides for train, val and test; non-negative, summing to 1. A zero
            share leaves that part empty.
        seed: makes the split reproducible; another seed gives another split.
        label_col: column of slide labels (any hashable values).
        group_col: column of patient ids; absent column or missing values mean one patient per slide.

    Returns:
        Series named "split" of "train" / "val" / "test", indexed like ``table``.
    """
    shares = _check_fractions(fractions, len(SPLIT_NAMES))
    counts, row_group, classes = _group_counts(table, label_col, group_col)
    part = _assign_groups(counts, shares, np.random.default_rng(seed), classes)
    split = pd.Series(np.asarray(SPLIT_NAMES, dtype=object)[part[row_group]], index=table.index, name="split")
    _log_summary(split, table[label_col])
    return split


def kfold_splits(
    table: pd.DataFrame,
    k: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    label_col: str = "label",
    group_col: str = "patient_id",
) -> list[pd.Series]:
    """Stratified, patient-grouped k-fold cross-validation with a validation part in each fold.

    Fold ``i`` tests on the i-th of k patient-disjoint, label-stratified folds; the other k-1 folds
    are split into "train" and "val" (``val_fraction`` of them, again grouped and stratified).

    Args:
        table: one row per slide, with a unique index.
        k: number of folds, at least 2 and at most the number of patients.
        seed: makes the folds reproducible.
        val_fraction: share of each fold's non-test slides used for validation, in [0, 1).
        label_col: column of slide labels.
        group_col: column of patient ids (see :func:`train_val_test_split`).

    Returns:
        k Series named "split" of "train" / "val" / "test", each indexed like ``table``; every slide
        is "test" in exactly one of them.
    """
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k-fold needs an integer k >= 2, got {k!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    counts, row_group, classes = _group_counts(table, label_col, group_col)
    if len(counts) < k:
        raise LabelTableError(
            f"{k}-fold cross-validation needs at least {k} patients; the table has {len(counts)}"
        )
    fold = _assign_groups(counts, np.full(k, 1.0 / k), np.random.default_rng(seed), classes)
    shares = np.array([1.0 - val_fraction, val_fraction])
    splits = []
    for i in range(k):
        rest = np.flatnonzero(fold != i)
        sub = _assign_groups(counts[rest], shares, np.random.default_rng([seed, i]), classes)
        names = np.full(len(counts), "test", dtype=object)
        names[rest] = np.where(sub == 0, "train", "val")
        split = pd.Series(names[row_group], index=table.index, name="split")
        _log_summary(split, table[label_col], prefix=f"fold {i}: ")
        splits.append(split)
    return splits


def save_splits(
    splits: pd.Series | Sequence[pd.Series],
    path: str | os.PathLike[str],
    slide_ids: Sequence[str] | None = None,
) -> None:
    """Write one split, or one per fold, as CSV ``slide_id,split[,fold]``, atomically.

    Args:
        splits: a Series from :func:`train_val_test_split`, or the list from :func:`kfold_splits`.
        path: the CSV file to write.
        slide_ids: slide ids in the Series' row order; by default the Series' index.
    """
    folds = [splits] if isinstance(splits, pd.Series) else list(splits)
    frames = []
    for i, split in enumerate(folds):
        ids = split.index if slide_ids is None else pd.Index(slide_ids)
        if len(ids) != len(split):
            raise ValueError(f"{len(ids)} slide ids for a split of {len(split)} slides")
        frame = pd.DataFrame({"slide_id": ids.astype(str), "split": split.to_numpy()})
        if not isinstance(splits, pd.Series):
            frame["fold"] = i
        _check_split_frame(frame, str(path))
        frames.append(frame)
    write_text(path, pd.concat(frames, ignore_index=True).to_csv(index=False))


def load_splits(path: str | os.PathLike[str]) -> pd.Series | list[pd.Series]:
    """Read splits written by :func:`save_splits`.

    Returns:
        A Series named "split" indexed by slide id (strings), or a list of them, one per fold,
        when the file has a ``fold`` column.

    Raises:
        LabelTableError: on missing columns, unknown split names, duplicated slides or gaps in folds.
    """
    df = pd.read_csv(path, dtype={"slide_id": str, "split": str})
    missing = {"slide_id", "split"} - set(df.columns)
    if missing:
        raise LabelTableError(f"{path}: missing column(s) {sorted(missing)}; expected slide_id,split[,fold]")
    if "fold" not in df.columns:
        _check_split_frame(df, str(path))
        return df.set_index("slide_id")["split"].rename("split")
    folds = sorted(df["fold"].unique().tolist())
    if folds != list(range(len(folds))):
        raise LabelTableError(f"{path}: folds must be numbered 0..k-1, found {folds}")
    out = []
    for i in folds:
        part = df[df["fold"] == i]
        _check_split_frame(part, f"{path} fold {i}")
        out.append(part.set_index("slide_id")["split"].rename("split"))
    return out


def _check_split_frame(df: pd.DataFrame, where: str) -> None:
    bad = sorted(set(df["split"]) - set(SPLIT_NAMES))
    if bad:
        raise LabelTableError(f"{where}: unknown split name(s) {bad}; expected {list(SPLIT_NAMES)}")
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise LabelTableError(f"{where}: slide(s) listed twice: {dup[:5]}")


def _check_fractions(fractions: Sequence[float], n_parts: int) -> np.ndarray:
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (n_parts,) or np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise ConfigError(
            f"fractions must be {n_parts} non-negative numbers summing to 1, got {list(fractions)}"
        )
    return shares


def _group_counts(table: pd.DataFrame, label_col: str, group_col: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Slides per (patient, class) as (G, C) counts, each row's patient index (N,), the C labels."""
    if not table.index.is_unique:
        raise LabelTableError("the slide table's index has duplicates; index it by slide id")
    if label_col not in table.columns:
        raise LabelTableError(
            f"the slide table has no label column {label_col!r}; columns: {list(table.columns)}"
        )
    labels = table[label_col]
    if labels.isna().any():
        raise LabelTableError(
            f"{int(labels.isna().sum())} slide(s) have no label, e.g. {list(table.index[labels.isna()][:5])}"
        )
    own = pd.Series(_OWN_PATIENT + table.index.astype(str), index=table.index)
    if group_col in table.columns:
        patients = table[group_col].astype(object).where(table[group_col].notna(), own).astype(str)
    else:
        patients = own
    row_group, groups = pd.factorize(patients, sort=True)
    row_label, classes = pd.factorize(labels, sort=True)
    counts = np.zeros((len(groups), int(row_label.max()) + 1 if len(row_label) else 0), dtype=np.int64)
    np.add.at(counts, (row_group, row_label), 1)
    return counts, row_group, list(classes)


def _assign_groups(
    counts: np.ndarray, shares: np.ndarray, rng: np.random.Generator, classes: Sequence[object]
) -> np.ndarray:
    """Assign each group (row of ``counts``, (G, C)) to a part; return the part index per group (G,)."""
    targets = np.outer(shares, counts.sum(axis=0))  # (P, C) slides wanted per part and class
    current = np.zeros_like(targets)
    active = shares > 0
    order = rng.permutation(len(counts))
    order = order[np.argsort(-counts.sum(axis=1)[order], kind="stable")]
    part = np.empty(len(counts), dtype=np.int64)
    for g in order:
        x = counts[g]
        # Change in squared distance to the targets if g joins each part; rounded so ties are ties.
        cost = np.round(((current + x - targets) ** 2 - (current - targets) ** 2).sum(axis=1), 9)
        cost[~active] = np.inf
        deficit = (targets - current).sum(axis=1)
        p = int(np.lexsort((-deficit, cost))[0])
        part[g] = p
        current[p] += x
    _repair_missing_classes(part, counts, active, classes)
    return part


def _repair_missing_classes(
    part: np.ndarray, counts: np.ndarray, active: np.ndarray, classes: Sequence[object]
) -> None:
    """Move patients so each active part holds each class, where the cohort allows it (in place)."""
    n_active = int(active.sum())
    for c in range(counts.shape[1]):
        holders = counts[:, c] > 0
        if holders.sum() < n_active:
            logger.warning(
                "label %r has only %d patient(s) for %d parts: some part will lack it",
                classes[c],
                int(holders.sum()),
                n_active,
            )
        for p in np.flatnonzero(active):
            if np.any(holders & (part == p)):
                continue
            n_hold = np.array([np.sum(holders & (part == q)) for q in range(len(active))])
            donor = int(np.argmax(n_hold))
            if n_hold[donor] < 2:
                continue
            candidates = np.flatnonzero(holders & (part == donor))
            in_donor = counts[part == donor].astype(bool).sum(axis=0)  # patients per class in donor
            # Prefer a patient whose leaving takes no class away from the donor, then the smallest.
            breaks = [np.any(counts[g].astype(bool) & (in_donor <= 1)) for g in candidates]
            sizes = counts[candidates].sum(axis=1)
            g = candidates[np.lexsort((sizes, breaks))[0]]
            part[g] = p


def _log_summary(split: pd.Series, labels: pd.Series, prefix: str = "") -> None:
    table = pd.crosstab(split, labels)
    logger.info("%sslides per split and label:\n%s", prefix, table.to_string())
