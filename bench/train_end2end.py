"""End-to-end training throughput: patches/s trained (backbone + head), learning, and peak memory.

Run by hand from the repository root (package installed): ``python bench/train_end2end.py [--backbone
test_resnet] [--weights random] [--tile-px 64] [--mpp 1.0] [--max-patches 16] [--eval-patches 32]
[--n-slides 20] [--size 1536] [--epochs 7] [--workers 0] [--device auto] [--amp --amp-dtype bfloat16]
[--grad-checkpointing] [--freeze-until STAGE] [--threads 2] [--out DIR]``.

A synthetic cohort is made and tiled once (lesions on 15% of the tissue of positive slides, a fixed
stratified split of 50/20/30%), then ``slidemil train --mode end2end`` runs in this process. Per epoch
it reports the training patches/s (tiles through backbone and head, forward and backward, reading
included: the tiles of the training bags over the training time of the epoch), the validation AUC, and
at the end the test AUC, the peak RSS of the process and, on CUDA, the peak GPU memory. For the
issue's GPU figure: ``--backbone resnet50 --tile-px 224 --mpp 0.5 --max-patches 500 --size 8192
--amp --workers 8``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil.config import load_config
from slidemil.slide.grid import TileSpec
from slidemil.slide.store import read_h5
from slidemil.slide.synth import SynthConfig, make_cohort
from slidemil.slide.tiling import TilingConfig
from slidemil.tile import tile_slides
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.loop import EpochResult, Trainer
from slidemil.trainer.run import run_training


def make_data(args: argparse.Namespace, work: Path) -> Path:
    table = make_cohort(work / "cohort", SynthConfig(n_slides=args.n_slides, size=args.size, lesion_fraction=0.15,
                                                     seed=0), progress=False)
    tile_slides(work / "cohort" / "slides", work / "tiles",
                TilingConfig(tile=TileSpec(patch_size=args.tile_px, mpp=args.mpp)))
    split = np.empty(len(table), dtype=object)
    for label in np.unique(table["label"]):
        rows = np.flatnonzero(table["label"] == label)
        n_train, n_val = len(rows) // 2, max(1, len(rows) // 5)
        split[rows] = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(rows) - n_train - n_val)
    table.assign(split=split).drop(columns="path").to_csv(work / "labels.csv", index=False)
    return work / "labels.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--weights", default="random")
    p.add_argument("--tile-px", type=int, default=64)
    p.add_argument("--mpp", type=float, default=1.0)
    p.add_argument("--max-patches", type=int, default=16)
    p.add_argument("--eval-patches", type=int, default=32)
    p.add_argument("--n-slides", type=int, default=20)
    p.add_argument("--size", type=int, default=1536)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="float16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--freeze-until")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    labels = make_data(args, work)
    table = pd.read_csv(labels)
    n_tiles = {s: len(read_h5(work / "tiles" / "coords" / f"{s}.h5", load_features=False).coords)
               for s in table["slide_id"]}
    train_tiles = sum(min(n_tiles[s], args.max_patches) for s in table.loc[table["split"] == "train", "slide_id"])
    cfg = load_config(TrainConfig, None, {
        "data.metadata": str(labels), "data.coords": str(work / "tiles"), "data.mode": "end2end",
        "backbone.name": args.backbone, "backbone.weights": args.weights, "backbone.freeze_until": args.freeze_until,
        "backbone.grad_checkpointing": args.grad_checkpointing, "data.max_patches": args.max_patches,
        "data.eval_patches": args.eval_patches, "data.workers": args.workers, "optim.epochs": args.epochs,
        "optim.lr": args.lr, "optim.warmup_epochs": 0, "optim.patience": 0, "model.dropout": 0.0,
        "device": args.device, "amp": args.amp, "amp_dtype": args.amp_dtype, "threads": args.threads,
        "log.tensorboard": False, "log.progress": False})
    rates = []

    def report(trainer: Trainer, result: EpochResult) -> None:
        seconds = len(trainer.task.datasets["train"]) / max(result.bags_per_s, 1e-9)  # training time only
        rates.append(train_tiles / seconds)
        print(f"epoch {result.epoch}: train loss {result.train_loss:.4f}, val AUC {(result.val or {}).get('auc')}, "
              f"{rates[-1]:.0f} patches/s trained, epoch {result.seconds:.1f} s")

    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    (result,) = run_training(cfg, work / "run", callbacks=[report])
    print(f"\n{args.backbone} at {args.tile_px} px, {args.max_patches} patches per bag, device {args.device}, "
          f"amp {args.amp} ({args.amp_dtype}), workers {args.workers}")
    print(f"patches/s trained: median {np.median(rates[1:] or rates):.0f} (epochs after the first), "
          f"max {max(rates):.0f}")
    print(f"test AUC {result.test_metrics.get('auc')}, balanced accuracy {result.test_metrics.get('balanced_accuracy')}"
          f", best epoch {result.best_epoch}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if torch.cuda.is_available() and args.device != "cpu":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.json:
        import json
        gpu = torch.cuda.is_available() and args.device != "cpu"
        args.json.write_text(json.dumps({
            "backbone": args.backbone, "tile_px": args.tile_px, "max_patches": args.max_patches, "amp": args.amp,
            "amp_dtype": args.amp_dtype, "device": args.device, "workers": args.workers,
            "patches_per_s_by_epoch": [round(r, 1) for r in rates],
            "patches_per_s": round(float(np.median(rates[1:] or rates)), 1),
            "test_auc": result.test_metrics.get("auc") if np.isfinite(result.test_metrics.get("auc", np.nan)) else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None}, indent=2))


if __name__ == "__main__":
    main()
