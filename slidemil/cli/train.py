"""CLI shims of `slidemil train` and `slidemil cv-summary`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slidemil.choices import (
    AmpDtype,
    BatchNormMode,
    DeviceKind,
    InitChoice,
    LossName,
    MilType,
    Scheduler,
    SelectRule,
    SlideContrast,
    TrainingMode,
    choices_of,
)
from slidemil.cli.common import Command, add_config_option


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metadata", help="CSV slide_id,label[,patient_id][,split]")
    p.add_argument("--features", help="features folder of `slidemil extract` (features mode)")
    p.add_argument("--coords", help="output folder of `slidemil tile` (end2end mode)")
    p.add_argument("--slides", help="end2end: slide files (folder, glob or CSV slide_id,path); default: a path "
                   "column of --metadata, else the slides the coords folder was tiled from")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--mode", choices=choices_of(TrainingMode),
                   help="features: a head on cached features (default); end2end: backbone and head on tiles")
    p.add_argument("--class-names", help="comma-separated class names, in label order")
    p.add_argument("--skip-missing", action="store_true", default=None,
                   help="drop slides whose feature file is missing or unreadable (with a warning)")
    p.add_argument("--seed", type=int, help="seed of splits, initialisation and sampling (0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last (fresh if none)")
    d = p.add_argument_group("bags")
    d.add_argument("--max-patches", type=int, help="tiles drawn per bag at train time; 0 = all (512)")
    d.add_argument("--eval-patches", type=int,
                   help="end2end: a fixed seeded subset of tiles per validation/test slide; 0 = all (1024)")
    d.add_argument("--batch-size", type=int, help="bags per step and process (1)")
    d.add_argument("--workers", type=int, help="DataLoader worker processes (0)")
    d.add_argument("--prefetch", type=int, help="batches each worker loads ahead (2)")
    d.add_argument("--cache", action="store_true", default=None, help="keep all bags in memory")
    m = p.add_argument_group("model")
    m.add_argument("--mil", choices=choices_of(MilType),
                   help="MIL head: gated or simple attention (ABMIL), clam_sb, clam_mb, dsmil, transmil (gated)")
    m.add_argument("--hidden-dim", type=int, help="projection width (256)")
    m.add_argument("--attention-dim", type=int, help="attention network width (128; DSMIL: its query)")
    m.add_argument("--dropout", type=float, help="dropout after the projection (0.25)")
    m.add_argument("--n-heads", type=int, help="TransMIL: attention heads (8)")
    m.add_argument("--landmarks", type=int, help="TransMIL: Nystrom landmarks (128)")
    m.add_argument("--pinv-iterations", type=int, help="TransMIL: pseudo-inverse iterations (6)")
    m.add_argument("--inits", type=int, help="heads trained side by side, each from its own initialisation; "
                   "with --slide-contrast auto this many of each kind (5)")
    m.add_argument("--init-choice", choices=choices_of(InitChoice),
                   help="what the run keeps of them: the head with the lowest validation loss, or their average "
                   "(val_loss)")
    m.add_argument("--slide-contrast", nargs="?", const="on", choices=choices_of(SlideContrast),
                   help="ABMIL heads that classify each slide by how its attended tiles differ from its own mean "
                   "tile: on (alone: on), off, or auto: --inits heads of each kind, the validation loss "
                   "choosing one (auto)")
    m.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                   help="feed raw features (default: standardised with training-set statistics)")
    b = p.add_argument_group("end-to-end backbone")
    b.add_argument("--backbone", help="backbone name (resnet50_trunc; any timm name, hf-hub:...)")
    b.add_argument("--weights", help="pretrained | random | path to a weights file (pretrained)")
    b.add_argument("--backbone-lr", type=float, help="peak learning rate of the backbone (--lr)")
    b.add_argument("--freeze-backbone", action="store_true", default=None, help="train the head only")
    b.add_argument("--freeze-until", metavar="STAGE",
                   help="freeze the backbone up to and including STAGE (layer3: a ResNet's layer4 trains; blocks.9)")
    b.add_argument("--batchnorm", choices=choices_of(BatchNormMode),
                   help="frozen: BatchNorm keeps its running statistics (default); train: per-batch statistics")
    b.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    b.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep NCHW memory in the backbone")
    b.add_argument("--backbone-batch", type=int, help="tiles per backbone forward at evaluation (256)")
    a = p.add_argument_group("end-to-end augmentation")
    a.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no tile augmentation (default: flips, 90-degree rotations, colour jitter)")
    a.add_argument("--colour-jitter", type=float, help="brightness, contrast and saturation jitter (0.1)")
    a.add_argument("--stain-jitter", type=float, help="H&E stain jitter strength, e.g. 0.05; 0 = off (0)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", choices=choices_of(LossName), help="loss (ce)")
    lo.add_argument("--focal-gamma", type=float, help="focal loss gamma (2)")
    lo.add_argument("--class-weights", action="store_true", default=None, help="inverse-frequency class weights")
    lo.add_argument("--weighted-sampling", action="store_true", default=None, help="class-balanced bag sampling")
    lo.add_argument("--label-smoothing", type=float, help="label smoothing (0)")
    lo.add_argument("--instance-weight", type=float, help="weight of the head's instance-level loss term, 0 = off "
                    "(the head's default: ABMIL's max-instance term 1, CLAM's clustering 0.43, DSMIL's 1)")
    lo.add_argument("--instance-k", type=int, help="tiles per bag that term looks at (the head's: 1; CLAM 8)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, help="peak learning rate (5e-4)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay (1e-4)")
    o.add_argument("--scheduler", choices=choices_of(Scheduler), help="after warm-up (cosine)")
    o.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs (1)")
    o.add_argument("--epochs", type=int, help="maximum epochs (40)")
    o.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (1.0)")
    o.add_argument("--accumulate", type=int, help="batches per optimisation step (gradient accumulation) (1)")
    o.add_argument("--select", choices=choices_of(SelectRule),
                   help="the weights the run keeps: the final epoch's, or the best validation epoch's (last)")
    o.add_argument("--patience", type=int, help="with --select best: early stopping patience in epochs, 0 = off (12)")
    o.add_argument("--monitor", help="validation metric of --select best and of the plateau schedule (auc; "
                   "balanced_accuracy, loss...)")
    o.add_argument("--device", choices=choices_of(DeviceKind), help="(auto)")
    o.add_argument("--threads", type=int, help="torch threads per process on CPU (all cores)")
    o.add_argument("--amp", action="store_true", default=None, help="mixed precision on CUDA")
    o.add_argument("--amp-dtype", choices=choices_of(AmpDtype), help="AMP precision (float16)")
    o.add_argument("--calibrate", action="store_true", default=None,
                   help="fit a temperature on the validation slides and store it in checkpoint_best")
    c = p.add_argument_group("cross-validation")
    c.add_argument("--folds", type=int, help="k-fold cross-validation, grouped by patient")
    c.add_argument("--fold", type=int, help="run only this fold (0..K-1), e.g. one per SLURM array task")
    w = p.add_argument_group("logging")
    w.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases")
    w.add_argument("--project", help="W&B project (slidemil)")
    w.add_argument("--run-name", help="W&B run name")
    add_config_option(p)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options as dotted TrainConfig keys (None: not given)."""
    class_names = [s.strip() for s in args.class_names.split(",")] if args.class_names else None
    jitter = args.colour_jitter
    return {
        "data.metadata": args.metadata, "data.features": args.features, "data.mode": args.mode,
        "data.coords": args.coords, "data.slides": args.slides,
        "data.class_names": class_names, "data.skip_missing": args.skip_missing,
        "data.max_patches": args.max_patches or None, "data.eval_patches": args.eval_patches or None,
        "data.batch_size": args.batch_size, "data.workers": args.workers, "data.cache": args.cache,
        "data.prefetch": args.prefetch,
        "backbone.name": args.backbone, "backbone.weights": args.weights, "backbone.lr": args.backbone_lr,
        "backbone.freeze": args.freeze_backbone, "backbone.freeze_until": args.freeze_until,
        "backbone.batchnorm": args.batchnorm, "backbone.grad_checkpointing": args.grad_checkpointing,
        "backbone.channels_last": args.channels_last,
        "backbone.chunk": args.backbone_batch,
        "augment.enabled": args.augment, "augment.brightness": jitter, "augment.contrast": jitter,
        "augment.saturation": jitter, "augment.stain": args.stain_jitter,
        "model.mil": args.mil, "model.hidden_dim": args.hidden_dim, "model.dropout": args.dropout,
        "model.attention_dim": args.attention_dim, "model.n_heads": args.n_heads, "model.landmarks": args.landmarks,
        "model.pinv_iterations": args.pinv_iterations, "model.standardize": args.standardize,
        "model.inits": args.inits, "model.init_choice": args.init_choice, "model.slide_contrast": args.slide_contrast,
        "loss.name": args.loss, "loss.focal_gamma": args.focal_gamma, "loss.class_weights": args.class_weights,
        "loss.weighted_sampling": args.weighted_sampling, "loss.label_smoothing": args.label_smoothing,
        "loss.instance_weight": args.instance_weight, "loss.instance_k": args.instance_k,
        "optim.lr": args.lr, "optim.weight_decay": args.weight_decay, "optim.scheduler": args.scheduler,
        "optim.warmup_epochs": args.warmup_epochs, "optim.epochs": args.epochs, "optim.grad_clip": args.grad_clip,
        "optim.accumulate": args.accumulate,
        "optim.select": args.select, "optim.patience": args.patience, "optim.monitor": args.monitor,
        "cv.folds": args.folds, "cv.fold": args.fold,
        "log.wandb": args.wandb, "log.project": args.project, "log.run_name": args.run_name,
        "seed": args.seed, "device": args.device, "threads": args.threads, "amp": args.amp,
        "amp_dtype": args.amp_dtype, "calibrate": args.calibrate,
    }


def load_train_config(args: argparse.Namespace) -> Any:
    """Defaults <- ``--config`` YAML <- command-line options; ``--max-patches 0`` and
    ``--eval-patches 0`` mean all tiles."""
    import dataclasses

    from slidemil.config import load_config
    from slidemil.trainer.config import TrainConfig
    cfg = load_config(TrainConfig, args.config, train_overrides(args))
    data = cfg.data
    if args.max_patches == 0:
        data = dataclasses.replace(data, max_patches=None)
    if args.eval_patches == 0:
        data = dataclasses.replace(data, eval_patches=None)
    return dataclasses.replace(cfg, data=data)


def run(args: argparse.Namespace) -> int:
    from slidemil.trainer.run import run_training
    run_training(load_train_config(args), args.out, resume=args.resume)
    return 0


def _summary_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="cross-validation run folder (with fold_<i>/)")


def summary(args: argparse.Namespace) -> int:
    from slidemil.trainer.cv import write_cv_summary
    write_cv_summary(args.out)
    return 0


COMMANDS = (
    Command("train", "train a MIL head (or backbone + head, --mode end2end) on slide labels "
         "(DDP under torchrun)",
            _train_options, run),
    Command("cv-summary", "write OUT/cv_summary.csv from the fold folders of a cross-validation run",
            _summary_options, summary),
)
