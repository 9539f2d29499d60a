"""MIL heads side by side on synthetic cohorts with small lesions: slide AUC per fold, attention AUC of the
lesion tiles, balanced accuracy at the recorded operating threshold, training time, head.onnx size and
head-only scoring time; and (``--memory``) the peak memory of one 50,000 x 2560 bag per head (inference on
ONNX Runtime and torch, and one training step on the whole bag).

Run by hand from the repository root (package installed)::

    python bench/mil_heads.py --work WORK [--cohorts NAME ...] [--variants NAME ...] [--seeds 0 ...]
        [--folds 5] [--jobs 1] [--set KEY=VALUE ...] [--memory]

Cohorts (``COHORTS``, built once in ``WORK/<cohort>/`` with ``slidemil synth``, ``slidemil tile`` and
``slidemil extract --backbone resnet18 --weights random``, then reused by every variant): subtle single
lesions on 0.5-1 % of the tissue (four synth seeds, 48-64 slides, 8192 or 12288 px), one cohort of larger
lesions (3 %), two more subtle cohorts (``holdout05_s4_12k``, ``holdout06_s5``: 0.5 % and 0.6 %) made after
the trainer's choice of epoch was taken on the others, and one (``holdout05_s6_12k``, 0.5 %) made after the
choice of initialisation was taken on all of those. Variants (``VARIANTS``): the default (gated ABMIL, five
plain and five slide-contrast heads, the one with the lowest validation loss kept), five
plain heads (the default before ``--slide-contrast auto``), five contrast heads (``--slide-contrast on``),
five plain heads averaged, one initialisation (the default before ``--inits``), and from one initialisation each: ABMIL with its max-instance term at 0.5 and
without it (earlier defaults), ABMIL keeping its best validation epoch (``--select best``, the earlier
rule), and every other head. Every (cohort, variant, seed) runs ``slidemil train --folds K`` (patient-grouped)
in ``WORK/runs/<cohort>/<variant>/seed<s>/`` and is skipped when its ``cv_summary.csv`` exists; fold
figures go to ``WORK/results.csv`` and the tables are printed (markdown) and written to
``WORK/tables.md``.

Figures:
- fold AUC: ``test_metrics.json`` of each fold (test slides, best checkpoint);
- attention AUC: per positive test slide, the within-slide AUC of the head's map for the lesion class
  (``attention_per_class`` where the head has one, else ``attention_raw``) between tiles at least half
  lesion and lesion-free tiles (truth masks of the synth), averaged over the slides that have both;
- BA@thr: balanced accuracy of the test slides at the operating threshold chosen on the fold's
  validation slides (what the package predicts; recomputed from the fold's validation and test
  predictions with the library's rule, so older runs follow the current rule); BA@argmax the same at
  argmax;
- s/epoch: mean wall time of an epoch (training and validation) on this machine, one thread;
- head.onnx MB and ms/slide: the exported head of fold 0 (``slidemil export``'s exporter), ONNX Runtime
  on the CPU with one thread, median over the cohort's slides of the first cohort given.

Runtime on 2 CPU cores: building the cohorts about 25 minutes (extraction at ~80 tiles/s), then per
cohort and variant 1-6 minutes (TransMIL the slowest); the default set of 5 cohorts x 7 variants takes
about 3 hours with ``--jobs 2``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Cohort:
    n_slides: int
    size: int
    lesion_fraction: float
    seed: int
    subtle: bool = True
    n_lesions: int | None = 1


COHORTS = {
    "subtle08_s0": Cohort(64, 8192, 0.008, 0),
    "subtle10_s3": Cohort(48, 8192, 0.01, 3),
    "subtle05_s1_12k": Cohort(48, 12288, 0.005, 1),
    "subtle075_s2": Cohort(48, 8192, 0.0075, 2),
    "easy03_s0": Cohort(40, 8192, 0.03, 0, subtle=False, n_lesions=None),
    # made after the default's choice of epoch (bench/model_selection.py) was taken on the cohorts above
    "holdout05_s4_12k": Cohort(48, 12288, 0.005, 4),
    "holdout06_s5": Cohort(48, 8192, 0.006, 5),
    # made after the choice of initialisation (--inits, --init-choice) was taken on all of the above
    "holdout05_s6_12k": Cohort(48, 12288, 0.005, 6),
}

# Every variant but the defaults trains one initialisation (``model.inits: 1``), as all did before --inits.
VARIANTS: dict[str, dict[str, Any]] = {
    # the default: 5 plain and 5 slide-contrast heads (--slide-contrast auto), the lowest validation loss kept
    "gated": {"model.mil": "gated"},
    # 5 plain heads: the default before --slide-contrast auto
    "gated_plain": {"model.mil": "gated", "model.slide_contrast": "off"},
    # 5 slide-contrast heads: the attended tiles against the slide's own mean tile
    "gated_contrast": {"model.mil": "gated", "model.slide_contrast": "on"},
    "gated_inits5_average": {"model.mil": "gated", "model.init_choice": "average"},  # 5 plain heads, averaged
    "gated_single": {"model.mil": "gated", "model.inits": 1},  # the default before --inits
    # the best validation epoch kept (early stopping), the trainer's rule before --select last
    "gated_select_best": {"model.mil": "gated", "optim.select": "best", "model.inits": 1},
    "gated_iw05": {"model.mil": "gated", "loss.instance_weight": 0.5, "model.inits": 1},  # the weight before 1.0
    "gated_no_instance": {"model.mil": "gated", "loss.instance_weight": 0.0, "model.inits": 1},
    "simple": {"model.mil": "simple", "model.inits": 1},
    "clam_sb": {"model.mil": "clam_sb", "model.inits": 1},
    "clam_mb": {"model.mil": "clam_mb", "model.inits": 1},
    "dsmil": {"model.mil": "dsmil", "model.inits": 1},
    "transmil": {"model.mil": "transmil", "model.inits": 1},
}


def set_values(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as TrainConfig overrides (YAML values). ``null`` is refused: an override of
    None means "not given" to the config, so it would silently change nothing."""
    import yaml

    values = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}
    unset = [k for k, v in values.items() if v is None]
    if unset:
        parser.error(f"--set {', '.join(unset)}=null would change nothing (None means 'not given'); give a value "
                     "(data.max_patches: a number of tiles larger than any bag draws them all)")
    return values


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slidemil", *args], check=True, stdout=subprocess.DEVNULL)


def build_cohort(work: Path, name: str) -> Path:
    """Synthesise, tile and extract one cohort (resumes; every step skips what is complete)."""
    c, root = COHORTS[name], work / name
    meta = root / "cohort" / "metadata.csv"
    done = meta.is_file() and len(list((root / "feats" / "features").glob("*.h5"))) == len(pd.read_csv(meta))
    if not done:
        args = ["synth", str(root / "cohort"), "--n-slides", str(c.n_slides), "--size", str(c.size),
                "--lesion-fraction", str(c.lesion_fraction), "--seed", str(c.seed)]
        args += (["--subtle"] if c.subtle else []) + (["--n-lesions", str(c.n_lesions)] if c.n_lesions else [])
        if not (root / "cohort" / "metadata.csv").is_file():
            sh(*args)
        if not (root / "tiles" / "tiling.csv").is_file():
            sh("tile", str(root / "cohort" / "metadata.csv"), "--out", str(root / "tiles"))
        sh("extract", str(root / "cohort" / "metadata.csv"), "--coords", str(root / "tiles"), "--out",
           str(root / "feats"), "--backbone", "resnet18", "--weights", "random")
    return root


# --- figures of one fold --------------------------------------------------------------------------------

def attention_aucs(root: Path, fold: Path) -> list[float]:
    """Within-slide AUC of the lesion class's map on each positive test slide (see the module docstring)."""
    from slidemil.artifacts.checkpoint import load_head
    from slidemil.evaluation.lesion_attention import head_lesion_aucs

    head, _ = load_head(fold / "checkpoint_best")
    preds = pd.read_csv(fold / "test_predictions.csv", dtype={"slide_id": str})
    return head_lesion_aucs(head, root / "feats" / "features", root / "cohort", zip(preds.slide_id, preds.label))


def operating_figures(fold: Path) -> tuple[float, float]:
    """The operating threshold the current rule chooses on the fold's validation predictions (those of its
    best checkpoint, as the trainer chooses it) and the test slides' balanced accuracy at it: runs trained
    before a change of the rule are judged by the rule of today."""
    from slidemil.evaluation.operating_point import balanced_accuracy_at, choose_operating_point

    val = pd.read_csv(fold / "val_predictions.csv")
    test = pd.read_csv(fold / "test_predictions.csv")
    prob = [c for c in val.columns if c.startswith("prob_")]
    if len(prob) != 2:
        return float("nan"), float("nan")
    op = choose_operating_point(val.label.to_numpy(), val[prob].to_numpy(), prob, 1)
    threshold = 0.5 if op is None else float(op["threshold"])
    return threshold, balanced_accuracy_at(test[prob[1]].to_numpy(), test.label.to_numpy() == 1, threshold)


def cv_config(work: str, cohort: str, seed: int, folds: int, settings: dict[str, Any]) -> Any:
    """The TrainConfig of ``--folds K`` cross-validation on a built cohort (cached bags, one thread), and this
    process set up for it (one torch thread, warnings only)."""
    import torch

    from slidemil.config import load_config
    from slidemil.trainer.config import TrainConfig

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    root = Path(work) / cohort
    overrides = {"data.metadata": str(root / "cohort" / "metadata.csv"), "data.features": str(root / "feats"),
                 "cv.folds": folds, "seed": seed, "data.cache": True, "threads": 1, "log.tensorboard": False,
                 "log.progress": False, **settings}
    return load_config(TrainConfig, None, overrides)


def run_cv(work: str, cohort: str, variant: str, settings: dict[str, Any], seed: int,
           folds: int) -> list[dict[str, Any]]:
    """``slidemil train --folds K`` of one variant (its TrainConfig ``settings``) on one cohort; one record per
    fold."""
    from slidemil.trainer.run import run_training

    root = Path(work) / cohort
    out = Path(work) / "runs" / cohort / variant / f"seed{seed}"
    if not (out / "cv_summary.csv").is_file():
        run_training(cv_config(work, cohort, seed, folds, settings), out, resume=True)
    records = []
    for i in range(folds):
        fold = out / f"fold_{i}"
        test = json.loads((fold / "test_metrics.json").read_text())
        epochs = pd.read_csv(fold / "metrics.csv")
        threshold, ba_threshold = operating_figures(fold)
        att = attention_aucs(root, fold)
        records.append({"cohort": cohort, "variant": variant, "seed": seed, "fold": i, "auc": test["auc"],
                        "ba_threshold": ba_threshold, "ba_argmax": test["balanced_accuracy"], "threshold": threshold,
                        "attention_auc": float(np.mean(att)) if att else float("nan"), "n_attention_slides": len(att),
                        "epochs": len(epochs), "s_per_epoch": float(epochs["seconds"].mean()),
                        "best_epoch": test["best_epoch"]})
    return records


# --- cost of the exported head ----------------------------------------------------------------------------

def head_cost(work: Path, cohort: str, variant: str, seed: int) -> dict[str, float]:
    """head.onnx size (MB), ONNX Runtime time per slide (ms, median, one thread) of fold 0's head, and its parity
    with the torch head on every slide of the cohort (max |d probability|, argmax agreement)."""
    import onnxruntime as ort
    import torch

    from slidemil.artifacts.checkpoint import load_head
    from slidemil.models.mil import BagHead
    from slidemil.models.onnx import export_head
    from slidemil.slide.store import read_h5

    head, meta = load_head(work / "runs" / cohort / variant / f"seed{seed}" / "fold_0" / "checkpoint_best")
    path = work / "onnx" / f"{variant}_{cohort}_seed{seed}.onnx"
    path.parent.mkdir(exist_ok=True)
    export_head(BagHead(head), path, meta["head_config"]["in_dim"])  # always: the run may have been retrained
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    times, dp, agree = [], [], []
    bag_head = BagHead(head).eval()
    for h5 in sorted((work / cohort / "feats" / "features").glob("*.h5")):
        x = read_h5(h5).features
        session.run(None, {"features": x})  # warm
        start = time.perf_counter()
        got = session.run(["probabilities"], {"features": x})[0]
        times.append(time.perf_counter() - start)
        with torch.no_grad():
            want = bag_head(torch.from_numpy(x))[1].numpy()
        dp.append(float(np.abs(got - want).max()))
        agree.append(bool(got.argmax() == want.argmax()))
    return {"onnx_mb": path.stat().st_size / 1e6, "ms_per_slide": 1000 * float(np.median(times)),
            "max_dp": max(dp), "argmax_agreement": float(np.mean(agree))}


# --- memory of one 50,000 x 2560 bag -----------------------------------------------------------------------

_MEMORY_CHILD = r"""
import sys, time, numpy as np, torch
mode, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
def hwm():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
from slidemil.models.mil import BagHead, HeadConfig, create_head
torch.manual_seed(0)
bag_head = BagHead(create_head(HeadConfig(mil_type=name, in_dim=2560, n_classes=2)))
if mode == "export":
    from slidemil.models.onnx import export_head
    export_head(bag_head, path, 2560)
    sys.exit()
x = np.random.default_rng(0).standard_normal((50_000, 2560), dtype=np.float32)
torch.set_num_threads(2)
if mode == "ort":
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    base, start = hwm(), time.perf_counter()
    session.run(None, {"features": x})
elif mode == "train":  # one training step on the whole bag (--max-patches 0): forward, auxiliary term, backward
    head = bag_head.head.train()
    head.keep_for_loss = head.default_instance_weight > 0
    base, start = hwm(), time.perf_counter()
    out = head(torch.from_numpy(x)[None])
    labels = torch.tensor([1])
    loss = torch.nn.functional.cross_entropy(out.logits, labels)
    aux = head.auxiliary_loss(labels) if head.keep_for_loss else None
    (loss if aux is None else loss + head.default_instance_weight * aux).backward()
else:
    base, start = hwm(), time.perf_counter()
    with torch.inference_mode():
        bag_head(torch.from_numpy(x))
print(f"{time.perf_counter() - start:.2f} {base:.0f} {hwm():.0f}")
"""


def memory_table(heads: list[str]) -> str:
    rows = ["| head | ONNX Runtime peak RSS (MB) | growth (MB) | s | torch peak RSS (MB) | growth (MB) | s | "
            "training step peak RSS (MB) | growth (MB) | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in heads:
            path = str(Path(tmp) / f"{name}.onnx")
            subprocess.run([sys.executable, "-c", _MEMORY_CHILD, "export", name, path], check=True,
                           capture_output=True)
            cells = [name]
            for mode in ("ort", "torch", "train"):
                out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode, name, path], check=True,
                                     capture_output=True, text=True).stdout.split()
                seconds, base, peak = float(out[0]), float(out[1]), float(out[2])
                cells += [f"{peak:,.0f}", f"{peak - base:,.0f}", f"{seconds:.1f}"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


# --- tables -----------------------------------------------------------------------------------------------

def _pm(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def tables(results: pd.DataFrame, costs: dict[str, dict[str, float]], subtle: list[str], easy: list[str]) -> str:
    lines = ["| head (variant) | fold AUC, subtle cohorts (mean ± sd) | worst fold | attention AUC | BA@thr | "
             "BA@argmax | easy cohort AUC (worst) | s/epoch | head.onnx MB | ms/slide | ONNX max |dp| | argmax agreement |",
             "|" + "---|" * 12]
    for variant, rows in results.groupby("variant", sort=False):
        s, e = rows[rows.cohort.isin(subtle)], rows[rows.cohort.isin(easy)]
        cost = costs.get(str(variant), {})
        easy_cell = f"{e.auc.mean():.3f} ({e.auc.min():.3f})" if len(e) else "-"
        lines.append(f"| {variant} | {_pm(s.auc)} | {s.auc.min():.3f} | {_pm(s.attention_auc.dropna())} | "
                     f"{_pm(s.ba_threshold)} | {_pm(s.ba_argmax)} | {easy_cell} | {rows.s_per_epoch.mean():.2f} | "
                     f"{cost.get('onnx_mb', float('nan')):.2f} | {cost.get('ms_per_slide', float('nan')):.1f} | "
                     f"{cost.get('max_dp', float('nan')):.1e} | {cost.get('argmax_agreement', float('nan')):.3f} |")
    lines += ["", "| cohort | head (variant) | fold AUC mean | worst | attention AUC | BA@thr | BA@argmax |",
              "|---|---|---|---|---|---|---|"]
    for (cohort, variant), rows in results.groupby(["cohort", "variant"], sort=False):
        lines.append(f"| {cohort} | {variant} | {rows.auc.mean():.3f} | {rows.auc.min():.3f} | "
                     f"{rows.attention_auc.mean():.3f} | {rows.ba_threshold.mean():.3f} | {rows.ba_argmax.mean():.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="cohorts, runs and results (reused across runs)")
    p.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (splits and initialisation)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="cross-validations in parallel (one thread each)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig settings for every variant (dotted keys, YAML values)")
    p.add_argument("--tag", default="", help="suffix of the variant names (with --set: a separate experiment)")
    p.add_argument("--no-costs", dest="costs", action="store_false", help="skip head.onnx size and timing")
    p.add_argument("--memory", action="store_true", help="only the 50,000 x 2560 memory table")
    args = p.parse_args()
    if args.memory:
        table = memory_table(list(VARIANTS_HEADS))
        print(table)
        return
    extra = set_values(p, args.set)
    settings = {v + args.tag: {**VARIANTS[v], **extra} for v in args.variants}
    args.variants = list(settings)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for name in args.cohorts:
        build_cohort(work, name)
    jobs = [(str(work), c, v, settings[v], s, args.folds) for c in args.cohorts for v in args.variants
            for s in args.seeds]
    records: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_cv, *job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            rows = future.result()
            records += rows
            r = pd.DataFrame(rows)
            print(f"{r.cohort[0]} {r.variant[0]} seed {r.seed[0]}: AUC {r.auc.mean():.3f} (worst {r.auc.min():.3f}), "
                  f"attention {r.attention_auc.mean():.3f}, BA@thr {r.ba_threshold.mean():.3f}", flush=True)
    results = pd.DataFrame(records)
    path = work / "results.csv"
    if path.is_file():  # keep other experiments' rows
        old = pd.read_csv(path)
        keys = set(zip(results.cohort, results.variant, results.seed))
        old = old[[k not in keys for k in zip(old.cohort, old.variant, old.seed)]]
        results = pd.concat([old, results], ignore_index=True)
    results.to_csv(path, index=False)
    mine = results[results.variant.isin(args.variants) & results.cohort.isin(args.cohorts) & results.seed.isin(args.seeds)]
    costs = {v: head_cost(work, args.cohorts[0], v, args.seeds[0]) for v in args.variants} if args.costs else {}
    subtle = [c for c in args.cohorts if COHORTS[c].subtle]
    easy = [c for c in args.cohorts if not COHORTS[c].subtle]
    table = tables(mine, costs, subtle, easy)
    (work / "tables.md").write_text(table + "\n")
    print(table)


VARIANTS_HEADS = ("gated", "simple", "clam_sb", "clam_mb", "dsmil", "transmil")

if __name__ == "__main__":
    main()
