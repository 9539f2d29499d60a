"""How well a head's attention finds a lesion: within-slide AUC of lesion tiles against lesion-free tiles,
on a cohort with truth masks (``slidemil synth`` writes them: ``lesion_masks/<id>.png`` and ``truth.json``).

A tile counts as lesion when at least ``LESION_MIN`` of it is lesion on the truth mask, and as negative
when none of it is; tiles in between are left out. The map scored is the one the engine draws for the
slide's true class: ``attention_per_class[class]`` where the head has one per class, else its
``attention_raw`` (the ranking is that of the normalised heatmap).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

LESION_MIN = 0.5  # share of a tile on the lesion for it to count as a lesion tile


def tile_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive tile outscores a negative one (ties count half)."""
    s, pos = np.asarray(score, np.float64), np.asarray(positive, bool)
    hi, lo = s[pos][:, None], s[~pos][None, :]
    return float(((hi > lo) + 0.5 * (hi == lo)).mean())


def lesion_fractions(cohort: str | Path, slide_id: str, coords: np.ndarray, size0: int) -> np.ndarray:
    """Share of each tile (level-0 ``coords`` (N, 2) of ``size0`` px) on the slide's truth lesion mask."""
    import cv2

    cohort = Path(cohort)
    mask = cv2.imread(str(cohort / "lesion_masks" / f"{slide_id}.png"), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"no truth mask {cohort / 'lesion_masks' / (slide_id + '.png')}; "
                                "lesion attention needs a cohort written by `slidemil synth`")
    d = int(json.loads((cohort / "truth.json").read_text())["mask_downsample"])
    lesion = mask > 127
    return np.array([lesion[y // d:(y + size0) // d, x // d:(x + size0) // d].mean() for x, y in coords])


def class_map(attention_raw: np.ndarray, attention_per_class: np.ndarray | None, class_index: int) -> np.ndarray:
    """The map of one bag drawn for ``class_index``: its row of the per-class maps, else the attention."""
    return attention_per_class[class_index] if attention_per_class is not None else attention_raw


def lesion_attention_auc(score: np.ndarray, fractions: np.ndarray) -> float | None:
    """Within-slide AUC of ``score`` between lesion tiles and lesion-free tiles; None without both."""
    keep = (fractions >= LESION_MIN) | (fractions == 0)
    positive = fractions[keep] >= LESION_MIN
    if not positive.any() or positive.all():
        return None
    return tile_auc(np.asarray(score)[keep], positive)


def head_lesion_aucs(head: Any, features_dir: str | Path, cohort: str | Path,
                     slides: Iterable[tuple[str, int]]) -> list[float]:
    """:func:`lesion_attention_auc` of a torch MIL head (``head(features (1, N, D))`` -> ``MILOutput``) on each
    positive slide of ``slides`` ((slide_id, label)) that has lesion and lesion-free tiles; bags are read from
    ``features_dir/<id>.h5`` (``slidemil extract``'s h5 folder), truth from the ``slidemil synth`` ``cohort``."""
    import torch

    from slidemil.slide.store import read_h5

    aucs = []
    for sid, label in slides:
        if int(label) == 0:
            continue
        bag = read_h5(Path(features_dir) / f"{sid}.h5")
        frac = lesion_fractions(cohort, sid, bag.coords, int(bag.attrs.patch_size_level0))
        with torch.no_grad():
            out = head(torch.from_numpy(bag.features)[None])
        per_class = None if out.attention_per_class is None else out.attention_per_class[0].numpy()
        auc = lesion_attention_auc(class_map(out.attention_raw[0].numpy(), per_class, int(label)), frac)
        if auc is not None:
            aucs.append(auc)
    return aucs
