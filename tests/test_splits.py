"""Splits: grouping by patient, stratification by label, determinism, files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidemil.errors import ConfigError, LabelTableError
from slidemil.trainer.splits import kfold_splits, load_splits, save_splits, train_val_test_split


def cohort(n_patients: int = 12, slides_per_patient: int = 2, positive_share: float = 0.5, seed: int = 0):
    """A slide table indexed by slide id; every patient's slides share one label."""
    rng = np.random.default_rng(seed)
    n_pos = int(round(n_patients * positive_share))
    patient_label = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n_patients - n_pos, int)])
    rows = [
        {
            "slide_id": f"s{p:03d}_{k}",
            "patient_id": f"p{p:03d}",
            "label": ["normal", "tumour"][patient_label[p]],
        }
        for p in range(n_patients)
        for k in range(slides_per_patient)
    ]
    return pd.DataFrame(rows).set_index("slide_id")


def assert_grouped(table: pd.DataFrame, split: pd.Series) -> None:
    parts_per_patient = split.groupby(table["patient_id"]).nunique()
    assert (parts_per_patient == 1).all(), parts_per_patient[parts_per_patient > 1]


def test_small_cohort_every_part_has_every_class_and_is_grouped():
    table = cohort(12, 2)  # 24 slides, 12 patients, 2 classes
    for seed in range(5):
        split = train_val_test_split(table, seed=seed)
        assert split.index.equals(table.index) and split.name == "split"
        assert_grouped(table, split)
        counts = pd.crosstab(split, table["label"])
        assert set(counts.index) == {"train", "val", "test"}
        assert (counts > 0).all().all(), counts
        assert counts.loc["train"].sum() >= 12


def test_rare_class_reaches_every_part():
    table = cohort(20, 1, positive_share=0.15)  # 3 tumour patients for 3 parts
    split = train_val_test_split(table, seed=3)
    counts = pd.crosstab(split, table["label"])
    assert (counts["tumour"] == 1).all(), counts


def test_larger_cohort_is_stratified_and_sized():
    rng = np.random.default_rng(0)
    table = cohort(150, 1, positive_share=0.3)
    extra = rng.choice(table.index, 60, replace=False)  # some patients with two slides
    more = table.loc[extra].copy()
    more.index = more.index + "_b"
    table = pd.concat([table, more])
    split = train_val_test_split(table, fractions=(0.7, 0.15, 0.15), seed=1)
    assert_grouped(table, split)
    share = split.value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    pos = (table["label"] == "tumour").groupby(split).mean()
    overall = (table["label"] == "tumour").mean()
    assert np.allclose(pos, overall, atol=0.04), pos


def test_deterministic_from_seed():
    table = cohort(30, 2)
    a = train_val_test_split(table, seed=7)
    assert a.equals(train_val_test_split(table, seed=7))
    assert any(not a.equals(train_val_test_split(table, seed=s)) for s in range(8, 12))


def test_missing_patient_ids_mean_one_patient_per_slide():
    table = cohort(12, 2).drop(columns="patient_id")
    split = train_val_test_split(table, seed=0)
    assert split.value_counts()["train"] >= 12
    table = cohort(12, 2)
    table.loc[table.index[:4], "patient_id"] = None
    split = train_val_test_split(table, seed=0)
    known = table["patient_id"].notna()
    assert_grouped(table[known], split[known])


def test_zero_fraction_leaves_part_empty():
    split = train_val_test_split(cohort(10, 1), fractions=(0.8, 0.2, 0.0))
    assert set(split) == {"train", "val"}


def test_bad_arguments():
    table = cohort(6, 1)
    with pytest.raises(ConfigError):
        train_val_test_split(table, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(LabelTableError):
        train_val_test_split(table, label_col="diagnosis")
    with pytest.raises(LabelTableError):
        kfold_splits(table, k=7)
    with pytest.raises(ConfigError):
        kfold_splits(table, k=1)
    unlabelled = table.copy()
    unlabelled.iloc[0, unlabelled.columns.get_loc("label")] = None
    with pytest.raises(LabelTableError):
        train_val_test_split(unlabelled)


def test_kfold_covers_each_slide_once_and_is_grouped():
    table = cohort(20, 2)
    folds = kfold_splits(table, k=4, seed=0, val_fraction=0.25)
    assert len(folds) == 4
    test_count = sum((f == "test").astype(int) for f in folds)
    assert (test_count == 1).all()
    for split in folds:
        assert split.index.equals(table.index)
        assert_grouped(table, split)
        counts = pd.crosstab(split, table["label"])
        assert set(counts.index) == {"train", "val", "test"} and (counts > 0).all().all(), counts
    again = kfold_splits(table, k=4, seed=0, val_fraction=0.25)
    assert all(a.equals(b) for a, b in zip(folds, again, strict=True))


def test_save_load_round_trip(tmp_path):
    table = cohort(12, 2)
    split = train_val_test_split(table)
    save_splits(split, tmp_path / "split.csv")
    loaded = load_splits(tmp_path / "split.csv")
    assert loaded.equals(split.rename_axis("slide_id"))
    folds = kfold_splits(table, k=3)
    save_splits(folds, tmp_path / "folds.csv")
    loaded_folds = load_splits(tmp_path / "folds.csv")
    assert isinstance(loaded_folds, list) and len(loaded_folds) == 3
    assert all(a.equals(b.rename_axis("slide_id")) for a, b in zip(loaded_folds, folds, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folds.csv", "split.csv"]  # no temporaries
    header = (tmp_path / "folds.csv").read_text().splitlines()[0]
    assert header == "slide_id,split,fold"


def test_save_with_explicit_ids_and_bad_files(tmp_path):
    table = cohort(6, 1).reset_index()
    split = train_val_test_split(table)
    save_splits(split, tmp_path / "s.csv", slide_ids=table["slide_id"])
    assert list(load_splits(tmp_path / "s.csv").index) == list(table["slide_id"])
    (tmp_path / "bad.csv").write_text("slide_id,split\na,train\nb,holdout\n")
    with pytest.raises(LabelTableError, match="holdout"):
        load_splits(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("slide_id,split\na,train\na,test\n")
    with pytest.raises(LabelTableError, match="twice"):
        load_splits(tmp_path / "dup.csv")
