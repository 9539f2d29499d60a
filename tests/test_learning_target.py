"""The learning target (README, Small lesions), by hand (``pytest -m slow``; about 10 minutes per cohort on 2 cores).

Synthetic cohort -> tile -> extract (the demo's backbone: resnet18, random weights) -> 5-fold
patient-grouped cross-validation of the trainer's defaults (the default head with its default
instance-level term, the operating threshold chosen on each fold's validation slides). Each cohort must
reach its targets:

- slide AUC of the test slides: mean over the folds, and the worst fold;
- attention AUC: per positive test slide, the within-slide AUC of the map the engine draws for the
  lesion class (``attention_per_class`` where the head has one, else the attention) between tiles at
  least half lesion and lesion-free tiles (truth masks), averaged over the folds' slides;
- balanced accuracy of the test slides at the recorded operating threshold (what the package predicts).

Cohorts: one subtle lesion on 0.5-1 % of the tissue (several seeds; the 0.5 % cohort at 12288 px so
that its lesion covers a few tiles), and lesions on 3 % of the tissue (every fold perfect).

Where the default stands (README, Benchmarks, "MIL heads on small lesions", "Which epoch the run keeps" and
"Several initialisations", "Slide contrast"; the same cohorts through ``bench/mil_heads.py``): the default
(final epoch; five plain and five slide-contrast heads, the one with the lowest validation loss kept) reached
AUC 1.0 in every fold of all eight cohorts at training seed 0, which this test uses, and of
``holdout05_s6_12k`` at seeds 1 and 2 too, where five plain heads had missed the lesion in two folds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidemil.artifacts.checkpoint import load_head
from slidemil.config import load_config
from slidemil.evaluation.lesion_attention import head_lesion_aucs
from slidemil.features.extract import ExtractConfig, extract_features
from slidemil.slide.synth import SynthConfig, make_cohort
from slidemil.tile import tile_slides
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.run import run_training

SUBTLE = {"auc_mean": 0.95, "auc_worst": 0.85, "attention": 0.95, "ba_threshold": 0.90}
COHORTS = {
    # a few lesions covering 3 % of the tissue: every fold perfect
    "easy": (SynthConfig(n_slides=40, size=8192, lesion_fraction=0.03, seed=0),
             {"auc_mean": 1.0, "auc_worst": 1.0, "attention": 0.95, "ba_threshold": 0.95}),
    # one subtle lesion on 0.8 % of the tissue (2-4 tiles of about 330)
    "subtle08_s0": (SynthConfig(n_slides=64, size=8192, lesion_fraction=0.008, n_lesions=1, subtle=True, seed=0),
                    SUBTLE),
    "subtle10_s3": (SynthConfig(n_slides=48, size=8192, lesion_fraction=0.01, n_lesions=1, subtle=True, seed=3),
                    SUBTLE),
    "subtle075_s2": (SynthConfig(n_slides=48, size=8192, lesion_fraction=0.0075, n_lesions=1, subtle=True, seed=2),
                     SUBTLE),
    # 0.5 % of the tissue at 12288 px: 3-5 of about 750 tiles
    "subtle05_s1_12k": (SynthConfig(n_slides=48, size=12288, lesion_fraction=0.005, n_lesions=1, subtle=True,
                                    seed=1), SUBTLE),
    # made after the trainer's choice of epoch was taken on the cohorts above
    "holdout05_s4_12k": (SynthConfig(n_slides=48, size=12288, lesion_fraction=0.005, n_lesions=1, subtle=True,
                                     seed=4), SUBTLE),
    "holdout06_s5": (SynthConfig(n_slides=48, size=8192, lesion_fraction=0.006, n_lesions=1, subtle=True, seed=5),
                     SUBTLE),
    # made after the choice of initialisation (--inits 5, lowest validation loss) was taken on those above
    "holdout05_s6_12k": (SynthConfig(n_slides=48, size=12288, lesion_fraction=0.005, n_lesions=1, subtle=True,
                                     seed=6), SUBTLE),
}


def _attention_aucs(cohort: Path, features: Path, fold: Path) -> list[float]:
    head, _ = load_head(fold / "checkpoint_best")
    preds = pd.read_csv(fold / "test_predictions.csv", dtype={"slide_id": str})
    return head_lesion_aucs(head, features / "features", cohort, zip(preds.slide_id, preds.label))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COHORTS))
def test_trainer_meets_the_learning_target(name: str, tmp_path: Path) -> None:
    synth, target = COHORTS[name]
    cohort, features = tmp_path / "cohort", tmp_path / "features"
    make_cohort(cohort, synth, progress=False)
    tile_slides(cohort / "metadata.csv", tmp_path / "tiles")
    extract_features(cohort / "metadata.csv", features, ExtractConfig(backbone="resnet18", backend="auto"),
                     coords_dir=tmp_path / "tiles")
    cfg = load_config(TrainConfig, None, {"data.metadata": str(cohort / "metadata.csv"), "data.features": str(features),
                                          "cv.folds": 5, "data.cache": True, "threads": 1,
                                          "log.tensorboard": False, "log.progress": False})
    results = run_training(cfg, tmp_path / "cv")
    aucs = [r.test_metrics["auc"] for r in results]
    tests = [json.loads((r.out / "test_metrics.json").read_text()) for r in results]
    ba = [t["balanced_accuracy_at_threshold"] for t in tests]
    attention = [a for r in results for a in _attention_aucs(cohort, features, r.out)]
    figures = {"aucs": aucs, "ba_threshold": ba, "attention": float(np.mean(attention))}
    assert np.mean(aucs) >= target["auc_mean"] and min(aucs) >= target["auc_worst"], figures
    assert np.mean(attention) >= target["attention"], figures
    assert np.mean(ba) >= target["ba_threshold"], figures
