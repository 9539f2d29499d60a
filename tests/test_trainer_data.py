"""Label-table validation, bag datasets, padding collate and epoch samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.errors import LabelTableError
from slidemil.models.mil import AttentionMIL
from slidemil.trainer.data import Bag, EpochSampler, FeatureBagDataset, collate_bags, subsample
from slidemil.trainer.modes import get_mode
from tests.trainer_fixtures import DIM, fast_config, make_feature_cohort, write_bag


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_feature_cohort(tmp_path_factory.mktemp("bags"), n_slides=8)


def _load(root: Path, table: pd.DataFrame | None = None, tmp: Path | None = None, **changes):  # type: ignore[no-untyped-def]
    csv = root / "metadata.csv"
    if table is not None:
        assert tmp is not None
        csv = tmp / "table.csv"
        table.to_csv(csv, index=False)
    return get_mode("features").load_cohort(fast_config(root, **{"data.metadata": str(csv), **changes}))


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "metadata.csv", dtype={"slide_id": str, "patient_id": str})


def test_valid_cohort_loads(cohort: Path) -> None:
    loaded = _load(cohort)
    assert loaded.class_names == ("0", "1")
    assert loaded.in_dim == DIM and len(loaded.table) == 8
    assert set(loaded.paths) == set(loaded.table.index)


@pytest.mark.parametrize("edit, names, expected", [
    (lambda t: pd.concat([t, t.iloc[[0]]]), None, "duplicated slide id(s): slide_000"),
    (lambda t: t.assign(slide_id=t.slide_id.where(t.index != 2, "nope")), None, "missing feature file(s): nope"),
    (lambda t: t.assign(slide_id=t.slide_id.where(t.index != 2, "")), None, "unknown slide id(s)"),
    (lambda t: t.assign(label=t.label.where(t.index != 1, 5)), ["neg", "pos"], "out of range [0, 2)"),
    (lambda t: t.assign(label=t.label.where(t.index != 1, -1)), None, "out of range"),
    (lambda t: t.assign(label=t.label.where(t.index != 1, 3)), None, "class(es) ['2'] have no slide"),
    (lambda t: t.assign(label=t.label.map({0: "benign", 1: "tumour"}).where(t.index != 3, "tumor")),
     ["benign", "tumour"], "unknown class name(s) ['tumor']"),
    (lambda t: t.assign(label=0), None, "a single class ['0']"),
    (lambda t: t.assign(label=0), ["0", "1"], "class(es) ['1'] have no slide"),
    (lambda t: t.assign(label=t.label.map({0: "a", 1: "b"})), ["a", "b", "c"], "class(es) ['c'] have no slide"),
    (lambda t: t.assign(label=t.label.astype(float).where(t.index != 0)), None, "without a label: slide_000"),
    (lambda t: t.assign(split="training"), None, "split value(s) ['training']"),
])
def test_each_bad_table_gets_its_error(cohort: Path, tmp_path: Path, edit, names, expected: str) -> None:  # type: ignore[no-untyped-def]
    changes = {"data.class_names": names} if names else {}
    with pytest.raises(LabelTableError) as info:
        _load(cohort, edit(_table(cohort)), tmp_path, **changes)
    assert expected in str(info.value)
    assert "1 problem(s)" in str(info.value)


def test_one_error_lists_every_problem(cohort: Path, tmp_path: Path) -> None:
    table = _table(cohort)
    table.loc[1, "label"] = -3
    table.loc[2, "slide_id"] = "ghost"
    table = pd.concat([table, table.iloc[[0]]])
    (tmp_path / "feats" / "features").mkdir(parents=True)
    for p in (cohort / "features").iterdir():
        (tmp_path / "feats" / "features" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "feats" / "features" / "slide_003.h5").write_bytes(b"truncated h5")
    with pytest.raises(LabelTableError) as info:
        _load(tmp_path / "feats", table, tmp_path)
    text = str(info.value)
    for part in ("duplicated slide id(s): slide_000", "out of range", "missing feature file(s): ghost",
                 "unreadable feature file(s): slide_003", "4 problem(s)"):
        assert part in text, text


def test_dims_that_disagree_and_foreign_backbone(cohort: Path, tmp_path: Path) -> None:
    feats = tmp_path / "f"
    (feats / "features").mkdir(parents=True)
    for p in (cohort / "features").iterdir():
        (feats / "features" / p.name).write_bytes(p.read_bytes())
    (feats / "backbone").mkdir()
    for p in (cohort / "backbone").iterdir():
        (feats / "backbone" / p.name).write_bytes(p.read_bytes())
    write_bag(feats / "features" / "slide_001.h5", "slide_001", np.zeros((5, DIM + 1)))
    write_bag(feats / "features" / "slide_002.h5", "slide_002", np.zeros((5, DIM)), sha="0" * 64)
    with pytest.raises(LabelTableError) as info:
        _load(feats, _table(cohort), tmp_path)
    assert "feature dimensions disagree" in str(info.value)
    assert "from another backbone feature file(s): slide_002" in str(info.value)


def test_skip_missing_drops_with_a_warning(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = pd.concat([_table(cohort), pd.DataFrame([{"slide_id": "gone", "label": 1, "patient_id": "px"}])])
    loaded = _load(cohort, table, tmp_path, **{"data.skip_missing": True})
    assert "gone" not in loaded.table.index and len(loaded.table) == 8
    assert "dropping 1 slide(s) with missing feature file(s): gone" in caplog.text


def test_class_names_map_text_labels(cohort: Path, tmp_path: Path) -> None:
    table = _table(cohort).assign(label=lambda t: t.label.map({0: "normal", 1: "tumour"}))
    loaded = _load(cohort, table, tmp_path, **{"data.class_names": ["tumour", "normal"]})
    assert loaded.class_names == ("tumour", "normal")
    assert (loaded.table["label"].to_numpy() == 1 - _table(cohort)["label"].to_numpy()).all()


def test_collate_pads_and_masks() -> None:
    bags = [Bag(torch.ones(3, 4), 1, 0), Bag(torch.full((5, 4), 2.0), 0, 7)]
    batch = collate_bags(bags)
    assert batch.inputs.shape == (2, 5, 4) and batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.inputs[0, 3:].abs().sum() == 0 and batch.labels.tolist() == [1, 0]
    assert batch.indices.tolist() == [0, 7]
    head = AttentionMIL(4, 2, hidden_dim=8, attention_dim=4, dropout=0.0).eval()
    padded = head(batch.inputs, batch.mask).logits[0]
    alone = head(bags[0].inputs[None]).logits[0]
    torch.testing.assert_close(padded, alone)


def test_dataset_subsamples_per_epoch_reproducibly(cohort: Path) -> None:
    loaded = _load(cohort)
    ids = list(loaded.table.index)
    ds = FeatureBagDataset(ids, [loaded.paths[s] for s in ids], loaded.table["label"].to_numpy(), max_patches=10,
                           seed=3, cache=True)
    a = ds[(0, 1)].inputs
    assert a.shape == (10, DIM)
    torch.testing.assert_close(ds[(0, 1)].inputs, a)
    assert not torch.equal(ds[(0, 2)].inputs, a)
    torch.testing.assert_close(ds[0].inputs, ds[(0, 0)].inputs)
    assert subsample(5, 10, np.random.default_rng(0)) is None


def test_sampler_shards_equal_single_process_order() -> None:
    single = EpochSampler(10, seed=1)
    single.set_epoch(4)
    ranks = [EpochSampler(10, seed=1, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    order = list(single)
    assert sorted(i for i, _ in order) == list(range(10)) and {e for _, e in order} == {4}
    interleaved = [i for pair in zip(*(list(s) for s in ranks)) for i in pair]
    assert interleaved == order
    single.set_epoch(5)
    assert list(single) != order


def test_weighted_sampler_balances_classes() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    weights = 1.0 / np.bincount(labels)[labels]
    sampler = EpochSampler(100, seed=0, weights=weights)
    drawn = np.concatenate([labels[[i for i, _ in sampler]] for sampler.epoch in range(20)])
    assert 0.4 < drawn.mean() < 0.6
