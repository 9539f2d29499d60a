"""`slidemil check`: h5 files, features folders, checkpoints and model packages held against their contracts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from slidemil.check import check_paths
from slidemil.cli import main
from slidemil.exporter.export import ExportConfig, export_checkpoint
from slidemil.exporter.parity import ParityConfig
from slidemil.slide.store import CHUNK_ROWS, check_h5, write_h5
from tests.test_exporter import make_checkpoint
from tests.trainer_fixtures import coords_attrs, make_feature_cohort


def _coords(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256 % 8192, np.arange(n) * 256 // 8192 * 256], axis=1)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "s.h5"
    write_h5(path, _coords(300), coords_attrs("s"), np.ones((300, 8), np.float32), encoder="test")
    return path


def test_files_written_by_the_store_hold_the_contract(good: Path, tmp_path: Path) -> None:
    assert check_h5(good) == []
    write_h5(tmp_path / "empty.h5", np.zeros((0, 2)), coords_attrs("empty"), np.zeros((0, 8)), encoder="test")
    write_h5(tmp_path / "coords_only.h5", _coords(5), coords_attrs("coords_only"))
    assert check_h5(tmp_path / "empty.h5") == [] and check_h5(tmp_path / "coords_only.h5") == []
    report = check_paths([tmp_path])
    assert report.ok and sorted(f.kind for f in report.findings) == ["coords", "features", "features"]


def _rewrite(path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    with h5py.File(path, "a") as f:
        change(f)
    return path


@pytest.mark.parametrize("change, problem", [
    (lambda f: f["coords"].attrs.__delitem__("patch_size_level0"), "lack attribute(s) ['patch_size_level0']"),
    (lambda f: f["features"].attrs.__delitem__("encoder"), "features lack attribute(s) ['encoder']"),
    (lambda f: f.attrs.__delitem__("slidemil_schema"), "root lacks attribute 'slidemil_schema'"),
    (lambda f: f["features"].__setitem__((5, 3), np.nan), "1 feature row(s) hold NaN"),
    (lambda f: f["coords"].__setitem__((7, 0), 8100), "1 tile(s) reach outside the 8192 x 6144 slide"),
    (lambda f: f["coords"].__setitem__(1, [0, 0]), "duplicate tiles"),
])
def test_each_departure_is_named(good: Path, change, problem: str) -> None:  # type: ignore[no-untyped-def]
    problems = check_h5(_rewrite(good, change))
    assert len(problems) == 1 and problem in problems[0], problems


def test_wrong_dtypes_chunking_and_truncation_are_named(tmp_path: Path, good: Path) -> None:
    with h5py.File(tmp_path / "float.h5", "w") as f:
        f.attrs["slidemil_schema"] = 1
        ds = f.create_dataset("coords", data=_coords(100).astype(np.float32), chunks=(10, 2))
        for key, value in vars(coords_attrs("float")).items():
            ds.attrs[key] = value
    problems = check_h5(tmp_path / "float.h5")
    assert any("coords is float32" in p for p in problems) and any("chunked by 10 rows" in p for p in problems)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in check_h5(cut)[0]
    assert check_h5(good) == [] and CHUNK_ROWS >= 64


def test_cli_reports_a_cohort_and_exits_1_on_a_bad_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_feature_cohort(tmp_path / "feats", n_slides=4)
    assert main(["check", str(root), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = sorted(f["kind"] for f in report["findings"])
    assert report["ok"] and kinds == ["backbone card", "features", "features", "features", "features", "tiling record"]
    (root / "features" / "slide_002.h5").write_bytes(b"not hdf5")
    with caplog.at_level(logging.INFO, logger="slidemil"):
        assert main(["check", str(root / "features")]) == 1
    assert "slide_002.h5 (coords): unreadable h5 file" in caplog.text and "3 of 4 hold their contract" in caplog.text


def test_checkpoints_and_packages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    quick = ExportConfig(parity=ParityConfig(n_tiles=8, batch_sizes=(1, 8), bag_sizes=(1, 20), n_slide_bags=2))
    pkg = export_checkpoint(ckpt, tmp_path / "model", quick)
    report = check_paths([ckpt.with_suffix(".json"), pkg.root])
    assert report.ok and [f.kind for f in report.findings] == ["checkpoint", "model package"]
    assert "onnx fp32 graphs (onnxruntime cpu) ok" in report.findings[1].detail
    with open(pkg.root / "head.onnx", "ab") as fh:
        fh.write(b"\0")
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    ckpt.with_suffix(".json").write_text(json.dumps({**meta, "backbone_card": None}))
    with caplog.at_level(logging.INFO, logger="slidemil"):
        assert main(["check", str(ckpt), str(pkg.root), str(tmp_path / "absent.h5")]) == 1
    assert "records no backbone" in caplog.text and "head.onnx has" in caplog.text and "no such file" in caplog.text
    shutil.rmtree(tmp_path / "run" / "backbone")
    assert not check_paths([tmp_path / "run"]).ok
