"""The lesion-attention measure of the learning target and bench/mil_heads.py, on hand-made truth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from slidemil.evaluation.lesion_attention import class_map, lesion_attention_auc, lesion_fractions, tile_auc


def test_tile_auc_counts_pairs_and_half_ties() -> None:
    assert tile_auc(np.array([3.0, 1.0, 2.0]), np.array([True, False, False])) == 1.0
    assert tile_auc(np.array([1.0, 1.0, 0.0, 2.0]), np.array([True, False, False, False])) == pytest.approx(0.5)


def test_fractions_from_the_truth_mask_and_partial_tiles_left_out(tmp_path: Path) -> None:
    (tmp_path / "lesion_masks").mkdir()
    mask = np.zeros((32, 64), np.uint8)  # 16 level-0 px per mask px: a 1024 x 512 slide
    mask[0:16, 0:16] = 255  # the tile at (0, 0) is all lesion
    mask[16:32, 16:24] = 255  # the tile at (256, 256) is half lesion
    cv2.imwrite(str(tmp_path / "lesion_masks" / "s.png"), mask)
    (tmp_path / "truth.json").write_text(json.dumps({"mask_downsample": 16}))
    coords = np.array([[0, 0], [256, 256], [512, 0], [768, 256]])
    frac = lesion_fractions(tmp_path, "s", coords, 256)
    np.testing.assert_allclose(frac, [1.0, 0.5, 0.0, 0.0])
    # lesion tiles >= 0.5: tiles 0 and 1 against 2 and 3
    assert lesion_attention_auc(np.array([0.9, 0.1, 0.5, 0.2]), frac) == pytest.approx(0.5)
    assert lesion_attention_auc(np.array([0.9, 0.8, 0.5, 0.2]), frac) == 1.0
    assert lesion_attention_auc(np.zeros(2), np.array([0.0, 0.0])) is None  # no lesion tile: nothing to rank
    with pytest.raises(FileNotFoundError, match="slidemil synth"):
        lesion_fractions(tmp_path, "missing", coords, 256)


def test_the_true_class_map_is_scored_where_a_head_has_one_per_class() -> None:
    raw = np.array([0.0, 1.0])
    per_class = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_array_equal(class_map(raw, per_class, 0), per_class[0])
    np.testing.assert_array_equal(class_map(raw, None, 1), raw)
