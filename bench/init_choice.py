"""What a run trained from several initialisations should keep: each rule applied to the same heads.

Reads the default variant's runs of ``bench/mil_heads.py`` (``WORK/runs/<cohort>/gated/seed<s>/fold_<i>/``,
trained with ``--inits 5``): ``checkpoint_inits`` holds every head's weights at the kept epoch. Each head
scores the fold's validation and test slides from the cached features; then per fold: any one head, the
heads averaged (mean log-probability, what ``--init-choice average`` exports), the lowest validation loss
of the first 3 (``--inits 3`` up to dropout draws) and of all 5 (the default), and the best validation AUC
(ties: loss). Fold AUC of the test slides, mean ± sd, worst, folds below 0.85, and how often the head
chosen by validation loss has the best test AUC of its fold.

Run by hand from the repository root after ``bench/mil_heads.py``::

    python bench/init_choice.py --work WORK --cohorts NAME ... [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from slidemil.artifacts.checkpoint import load_head
from slidemil.models.ensemble import EnsembleHead
from slidemil.slide.store import read_h5


def fold_heads(work: Path, cohort: str, fold: Path) -> pd.DataFrame:
    """One row per head: its mean validation loss, validation AUC and test AUC, and the fold's log-probabilities."""
    head, _ = load_head(fold / "checkpoint_inits")
    assert isinstance(head, EnsembleHead), fold
    split = pd.read_csv(fold / "splits.csv").set_index("slide_id")["split"]
    labels = pd.read_csv(work / cohort / "cohort" / "metadata.csv").set_index("slide_id")["label"]
    parts = {}
    with torch.no_grad():
        for part in ("val", "test"):
            ids = split.index[split == part]
            logp = np.array([[torch.log_softmax(m(torch.from_numpy(
                read_h5(work / cohort / "feats" / "features" / f"{sid}.h5").features)[None]).logits, -1)[0].numpy()
                for m in head.heads()] for sid in ids])  # slides x heads x classes
            parts[part] = (labels.loc[ids].to_numpy(), logp)
    (yv, lv), (yt, lt) = parts["val"], parts["test"]
    rows = [{"head": k, "val_loss": float(-lv[np.arange(len(yv)), k, yv].mean()),
             "val_auc": roc_auc_score(yv, lv[:, k, 1]) if len(set(yv)) > 1 else np.nan,
             "test_auc": roc_auc_score(yt, lt[:, k, 1])} for k in range(lv.shape[1])]
    frame = pd.DataFrame(rows)
    mean = lt.mean(axis=1)  # the averaged head's logits: softmax of the mean log-probabilities
    frame.attrs["average_auc"] = roc_auc_score(yt, np.exp(mean[:, 1]) / np.exp(mean).sum(axis=1))
    return frame


def rules(frame: pd.DataFrame) -> dict[str, float]:
    by_loss = frame.val_loss.to_numpy()
    return {"any one head": float("nan"), "the heads averaged": frame.attrs["average_auc"],
            "lowest validation loss of the first 3": frame.test_auc.iloc[int(by_loss[:3].argmin())],
            "lowest validation loss of 5 (default)": frame.test_auc.iloc[int(by_loss.argmin())],
            "best validation AUC (ties: loss)": frame.sort_values(["val_auc", "val_loss"], ascending=[False, True])
            .test_auc.iloc[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cohorts", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--variant", default="gated")
    args = p.parse_args()
    chosen: dict[str, list[float]] = {}
    singles, best_hits = [], []
    for cohort in args.cohorts:
        for seed in args.seeds:
            for fold in sorted((args.work / "runs" / cohort / args.variant / f"seed{seed}").glob("fold_*")):
                frame = fold_heads(args.work, cohort, fold)
                singles += frame.test_auc.tolist()
                for name, value in rules(frame).items():
                    chosen.setdefault(name, []).append(value)
                best_hits.append(frame.test_auc.iloc[int(frame.val_loss.argmin())] == frame.test_auc.max())
    chosen["any one head"] = singles
    print("| what the run keeps | fold AUC | worst | folds < 0.85 |\n|---|---|---|---|")
    for name, values in chosen.items():
        v = np.asarray(values)
        print(f"| {name} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | {v.min():.3f} | {(v < 0.85).sum()} of {len(v)} |")
    print(f"\nthe head of lowest validation loss has its fold's best test AUC in {np.mean(best_hits):.0%} of "
          f"{len(best_hits)} folds")


if __name__ == "__main__":
    main()
