"""The learning target (README, Small lesions), by hand (``pytest -m slow``; about 10 minutes per cohort on 2 cores).

Synthetic cohort -> tile -> extract (the demo's backbone: resnet18, random weights) -> 5-fold
cross-validation of the trainer's defaults with the max-instance term on (``--instance-weight
0.5``, see :class:`slidemil.trainer.config.LossConfig`; without it one subtle lesion is found in
most folds but not all). The slide AUC of every fold and the attention's ranking of lesion tiles
(tiles at least half lesion against lesion-free tiles of the same positive test slide, on the
truth masks) must reach the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.artifacts.checkpoint import load_head
from slidemil.config import load_config
from slidemil.features.extract import ExtractConfig, extract_features
from slidemil.slide.store import read_h5
from slidemil.slide.synth import SynthConfig, make_cohort
from slidemil.tile import tile_slides
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.run import run_training

COHORTS = {
    # a few lesions covering 3 % of the tissue: every fold perfect
    "easy": (SynthConfig(n_slides=40, size=8192, lesion_fraction=0.03, seed=0), 1.0),
    # one subtle lesion on 0.8 % of the tissue (2-4 tiles of about 330): AUC >= 0.95
    "subtle": (SynthConfig(n_slides=64, size=8192, lesion_fraction=0.008, n_lesions=1, subtle=True, seed=0), 0.95),
}


def _tile_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive tile outscores a negative one (ties count half)."""
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _attention_aucs(cohort: Path, features: Path, fold: Path) -> list[float]:
    """Within-slide AUC of the raw attention score (lesion >= 50 % vs lesion-free tiles)."""
    import cv2
    head, _ = load_head(fold / "checkpoint_best")
    preds = pd.read_csv(fold / "test_predictions.csv", dtype={"slide_id": str})
    aucs = []
    for sid in preds.slide_id[preds.label == 1]:
        bag = read_h5(features / "features" / f"{sid}.h5")
        size0 = int(bag.attrs.patch_size_level0)
        mask = cv2.imread(str(cohort / "lesion_masks" / f"{sid}.png"), cv2.IMREAD_GRAYSCALE) > 127
        d = 16  # SynthConfig.mask_downsample
        frac = np.array([mask[y // d:(y + size0) // d, x // d:(x + size0) // d].mean() for x, y in bag.coords])
        with torch.no_grad():
            score = head(torch.from_numpy(bag.features)[None]).attention_raw[0].numpy()
        keep = (frac >= 0.5) | (frac == 0)
        aucs.append(_tile_auc(score[keep], frac[keep] >= 0.5))
    return aucs


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
                                          "cv.folds": 5, "loss.instance_weight": 0.5,
                                          "data.cache": True, "threads": 1,
                                          "log.tensorboard": False, "log.progress": False})
    results = run_training(cfg, tmp_path / "cv")
    aucs = [r.test_metrics["auc"] for r in results]
    attention = [a for r in results for a in _attention_aucs(cohort, features, r.out)]
    assert min(aucs) >= target, aucs
    assert np.mean(attention) >= 0.95, attention
