"""Shared fixtures: offline hub, a small synthetic cohort, the real slide files of tests/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_DATA = Path(__file__).resolve().parent / "data"  # origins and licences: tests/data/README.md


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real slide fixtures (read-only); tests copy files before touching them."""
    assert (REAL_DATA / "CMU-1-Small-Region.svs").is_file(), f"the real fixtures of {REAL_DATA} are missing"
    return REAL_DATA


@pytest.fixture
def fixture_copy(real_data: Path, tmp_path: Path):
    """Copy one real fixture into tmp_path and return the copy's path."""
    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copy(real_data / name, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory):
    """One positive synthetic Aperio slide (4096 px wide, lesions of 3% of tissue) and its truth."""
    import numpy as np

    from slidemil.slide.synth import write_slide
    path = tmp_path_factory.mktemp("synth") / "pos.svs"
    truth = write_slide(path, size=4096, label=1, n_classes=2, lesion_fraction=0.03,
                        rng=np.random.default_rng(7))
    return path, truth


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """A small synthetic cohort: 4 slides of 2048 px, 2 classes, its metadata table."""
    from slidemil.slide.synth import SynthConfig, make_cohort
    out = tmp_path_factory.mktemp("cohort")
    table = make_cohort(out, SynthConfig(n_slides=4, n_classes=2, size=2048, seed=3), progress=False)
    return out, table


from tests.slurm.fixtures import live_slurm  # noqa: E402,F401  (session fixture: a local Slurm for -m slurm)
