"""Which checkpoint to keep: checkpoint-selection rules compared on the same training trajectories.

Every fold of ``slidemil train --folds K`` is trained for all its epochs (no early stopping), and after
each epoch the validation and test slides' probabilities are recorded (``trajectory.csv`` in each fold
folder). Each rule then picks its epoch from the validation figures alone, exactly as the trainer would
have stopped and chosen, and is judged on the test slides of the epoch it picked: fold AUC, worst fold,
and balanced accuracy at the operating threshold the library chooses on that epoch's validation slides.
One training run per fold serves every rule, so the rules are compared side by side on identical models.
Each fold trains one initialisation (``model.inits: 1``; ``--set model.inits=5`` records the average of
five): the choice among initialisations comes after the choice of epoch, and ``bench/mil_heads.py``
measures it.

Run by hand from the repository root (package installed), on the cohorts of ``bench/mil_heads.py``::

    python bench/model_selection.py --work WORK [--cohorts NAME ...] [--seeds 0 1] [--jobs 2]
        [--epochs 40] [--set KEY=VALUE ...] [--tag NAME]

Runs go to ``WORK/selection/<tag>/<cohort>/seed<s>/`` (skipped when complete), the per-fold table to
``WORK/selection/<tag>/rules.csv`` and the summary (markdown) to ``.../rules.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd


def mil_heads() -> ModuleType:
    """The sibling script bench/mil_heads.py: its cohorts, their builder, the CV settings."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import mil_heads as module

    return module


# --- trajectories ----------------------------------------------------------------------------------------

def _record_epoch(trainer: Any, result: Any) -> None:
    """Callback: the validation and test probabilities of this epoch's weights -> ``trajectory.csv``."""
    rows = []
    for part in ("val", "test"):
        dataset = trainer.task.datasets[part]
        if len(dataset) == 0:
            continue
        for index, _, probs, loss in trainer.predict(part):
            rows.append({"epoch": result.epoch, "part": part, "slide_id": dataset.slide_ids[index],
                         "label": int(dataset.labels[index]), "prob": float(probs[1]), "loss": loss})
    if trainer.ctx.is_main:
        path = trainer.out / "trajectory.csv"
        pd.DataFrame(rows).to_csv(path, mode="a", header=not path.is_file(), index=False)


def run_trajectories(work: str, cohort: str, seed: int, folds: int, epochs: int, tag: str,
                     settings: dict[str, Any]) -> Path:
    from slidemil.trainer.run import run_training

    out = Path(work) / "selection" / tag / cohort / f"seed{seed}"
    # one initialisation unless --set says otherwise: the epoch is chosen before the initialisation (trainer.inits)
    cfg = mil_heads().cv_config(work, cohort, seed, folds, {"optim.epochs": epochs, "optim.patience": 0,
                                                            "model.inits": 1, **settings})
    if not (out / "cv_summary.csv").is_file():
        for fold in out.glob("fold_*"):  # an interrupted fold restarts: its trajectory must hold every epoch
            if not (fold / "test_metrics.json").is_file():
                for f in fold.iterdir():
                    f.unlink()
        run_training(cfg, out, resume=True, callbacks=[_record_epoch])
    return out


# --- selection rules -------------------------------------------------------------------------------------

def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def epoch_table(traj: pd.DataFrame) -> pd.DataFrame:
    """Per epoch: validation AUC and loss (the trainer's figures), and the slides' probabilities."""
    rows = []
    for epoch, frame in traj.groupby("epoch"):
        val = frame[frame.part == "val"]
        rows.append({"epoch": int(epoch), "val_auc": _auc(val.label.to_numpy(), val.prob.to_numpy()),
                     "val_loss": float(val["loss"].mean())})
    return pd.DataFrame(rows).set_index("epoch")


Rule = Callable[[pd.DataFrame], int]


def monitored(metric: str, patience: int, min_epoch: int = 1, ties: str | None = "val_loss") -> Rule:
    """The trainer's rule: best ``metric`` (ties: lower ``ties``), stop after ``patience`` epochs without
    improvement (0: never); epochs before ``min_epoch`` are never chosen and do not count for patience."""
    maximise = metric != "val_loss"

    def better(new: float, best: float | None) -> bool:
        if np.isnan(new):
            return False
        return best is None or (new > best if maximise else new < best)

    def rule(table: pd.DataFrame) -> int:
        best_value: float | None = None
        best_tie, best_epoch, bad = float("inf"), int(table.index[-1]), 0
        for epoch, row in table.iterrows():
            if int(epoch) < min_epoch:
                continue
            value, tie = float(row[metric]), float(row[ties]) if ties else 0.0
            if better(value, best_value) or (ties and value == best_value and tie < best_tie):
                best_value, best_tie, best_epoch, bad = value, tie, int(epoch), 0
            else:
                bad += 1
                if patience and bad >= patience:
                    break
        return best_epoch

    return rule


def smoothed(metric: str, window: int, patience: int, min_epoch: int = 1) -> Rule:
    """``monitored`` on the trailing mean of ``window`` epochs of ``metric`` (the chosen epoch is the window's
    last)."""
    def rule(table: pd.DataFrame) -> int:
        smooth = table.copy()
        smooth[metric] = table[metric].rolling(window, min_periods=1).mean()
        return monitored(metric, patience, min_epoch, "val_loss")(smooth)

    return rule


RULES: dict[str, Rule] = {
    "auc, p12 (--select best)": monitored("val_auc", 12),
    "auc, p20": monitored("val_auc", 20),
    "auc, no stop": monitored("val_auc", 0),
    "loss, p12": monitored("val_loss", 12, ties=None),
    "loss, no stop": monitored("val_loss", 0, ties=None),
    "auc, from 5, p12": monitored("val_auc", 12, 5),
    "auc, from 10, p12": monitored("val_auc", 12, 10),
    "auc, from 10, no stop": monitored("val_auc", 0, 10),
    "auc 3-mean, p12": smoothed("val_auc", 3, 12),
    "auc 5-mean, p12": smoothed("val_auc", 5, 12),
    "auc 5-mean, no stop": smoothed("val_auc", 5, 0),
    "last epoch (--select last)": lambda table: int(table.index[-1]),
}


def judge(traj: pd.DataFrame, epoch: int) -> dict[str, float]:
    from slidemil.evaluation.operating_point import balanced_accuracy_at, choose_operating_point

    at = traj[traj.epoch == epoch]
    val, test = at[at.part == "val"], at[at.part == "test"]
    yv, pv = val.label.to_numpy(), val.prob.to_numpy()
    op = choose_operating_point(yv, np.stack([1 - pv, pv], 1), ["0", "1"], 1)
    threshold = 0.5 if op is None else float(op["threshold"])
    yt, pt = test.label.to_numpy(), test.prob.to_numpy()
    return {"auc": _auc(yt, pt), "ba_threshold": balanced_accuracy_at(pt, yt == 1, threshold),
            "ba_argmax": balanced_accuracy_at(pt, yt == 1, 0.5)}


def rule_records(out: Path, cohort: str, seed: int) -> list[dict[str, Any]]:
    records = []
    for fold in sorted(out.glob("fold_*")):
        traj = pd.read_csv(fold / "trajectory.csv", dtype={"slide_id": str})
        traj = traj.drop_duplicates(["epoch", "part", "slide_id"], keep="last")
        table = epoch_table(traj)
        for name, rule in RULES.items():
            epoch = rule(table)
            records.append({"cohort": cohort, "seed": seed, "fold": fold.name, "rule": name, "epoch": epoch,
                            **judge(traj, epoch)})
    return records


def summary(frame: pd.DataFrame) -> str:
    runs = frame.groupby(["rule", "cohort", "seed"]).agg(auc=("auc", "mean"), worst=("auc", "min"),
                                                       ba=("ba_threshold", "mean")).reset_index()
    runs["on_target"] = (runs.auc >= 0.95) & (runs.worst >= 0.85) & (runs.ba >= 0.90)
    table = frame.groupby("rule", sort=False).agg(
        auc=("auc", "mean"), sd=("auc", "std"), worst=("auc", "min"), below=("auc", lambda a: int((a < 0.85).sum())),
        folds=("auc", "size"), ba=("ba_threshold", "mean"), ba_argmax=("ba_argmax", "mean"),
        epoch=("epoch", "mean"))
    on_target = runs.groupby("rule").on_target.agg(["sum", "size"])
    lines = ["| rule | fold AUC | worst | folds < 0.85 | BA@thr | BA@argmax | mean epoch | runs on target* |",
             "|---|---|---|---|---|---|---|---|"]
    for rule, r in table.iterrows():
        hit = on_target.loc[rule]
        lines.append(f"| {rule} | {r.auc:.3f} ± {r.sd:.3f} | {r.worst:.3f} | {r.below}/{r.folds} | {r.ba:.3f} | "
                     f"{r.ba_argmax:.3f} | {r.epoch:.1f} | {hit['sum']} of {hit['size']} |")
    lines.append("\n*a run = one cohort at one seed; on target: mean fold AUC >= 0.95, no fold < 0.85, BA@thr >= 0.90 "
                 "(attention AUC is not judged here)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--cohorts", nargs="+",
                        default=["subtle08_s0", "subtle10_s3", "subtle075_s2", "subtle05_s1_12k", "easy03_s0"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--tag", default="default", help="name of this set of runs (one per --set)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig settings for every run (YAML values), e.g. model.mil=dsmil")
    args = parser.parse_args(argv)

    settings = mil_heads().set_values(parser, args.set)
    for cohort in args.cohorts:
        mil_heads().build_cohort(args.work, cohort)
    jobs = [(str(args.work), c, s, args.folds, args.epochs, args.tag, settings)
            for c in args.cohorts for s in args.seeds]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        outs = list(pool.map(run_trajectories, *zip(*jobs)))
    frame = pd.DataFrame([r for (_, c, s, *_), out in zip(jobs, outs) for r in rule_records(out, c, s)])
    base = args.work / "selection" / args.tag
    frame.to_csv(base / "rules.csv", index=False)
    text = summary(frame[frame.cohort.str.startswith(("subtle", "holdout"))])
    easy = frame[~frame.cohort.str.startswith(("subtle", "holdout"))]
    if len(easy):
        rows = [f"| {rule} | {a['mean']:.3f} | {a['min']:.3f} |"
                for rule, a in easy.groupby("rule", sort=False).auc.agg(["mean", "min"]).iterrows()]
        text += ("\n\nLarger lesions (" + ", ".join(sorted(easy.cohort.unique())) + "): fold AUC per rule\n\n"
                 "| rule | mean | worst |\n|---|---|---|\n" + "\n".join(rows))
    (base / "rules.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
