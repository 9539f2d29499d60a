"""The training recipe, one loop for every mode: setup -> train -> save -> test -> cleanup.

The loop sees a model ``BagBatch -> MILOutput`` and bag datasets (:mod:`slidemil.trainer.modes`);
it owns the optimisation (AdamW with parameter groups, warm-up schedule, gradient accumulation,
clipping, AMP), evaluation (every validation and test slide exactly once, sharded over ranks and
gathered, so the numbers equal a single process's), the choice of the kept weights (the last epoch's,
or the best validation epoch's with early stopping: ``optim.select``), checkpoints, resume and the
evaluation of the kept checkpoint (calibrated first where asked: see :mod:`slidemil.trainer.recipe`).
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from slidemil.artifacts import checkpoint as ckpt
from slidemil.atomic import atomic_path, write_json
from slidemil.config import config_changes, save_config
from slidemil.errors import ConfigError
from slidemil.evaluation.metrics import compute_metrics, flat_metrics, is_better
from slidemil.evaluation.operating_point import balanced_accuracy_at, predict_index
from slidemil.models.mil import MILOutput
from slidemil.processes import worker_context
from slidemil.trainer.config import TrainConfig
from slidemil.trainer.data import BagDataset, EpochSampler, collate_bags
from slidemil.trainer.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    average_batchnorm_statistics,
    shard,
    wrap_ddp,
)
from slidemil.trainer.logs import RunLog
from slidemil.trainer.losses import (
    inverse_frequency_weights,
    make_loss,
    sample_weights_for_balancing,
)
from slidemil.trainer.rng import rng_state, set_rng_state
from slidemil.trainer.schedule import LRSchedule
from slidemil.trainer.task import Cohort, TrainingTask

log = logging.getLogger(__name__)

BEST, LAST = "checkpoint_best", "checkpoint_last"
INITS = "checkpoint_inits"  # the kept epoch's weights of every initialisation, once one of them was chosen
_RANKING = ("auc", "average_precision")


@dataclass
class EpochResult:
    """What one epoch did (given to callbacks after the epoch's checkpoints are written)."""

    epoch: int
    train_loss: float
    val: dict[str, Any] | None
    lr: float
    seconds: float
    bags_per_s: float
    improved: bool


@dataclass
class Progress:
    """Loop state saved with ``checkpoint_last`` (epochs are counted from 1)."""

    epoch: int = 0
    best_value: float | None = None
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run (one fold)."""

    out: Path
    best_epoch: int
    val_metrics: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)


Callback = Callable[["Trainer", EpochResult], None]


class Trainer:
    """One run: ``setup(resume)``, ``train()``, ``test()``, ``cleanup()``.

    Args:
        cfg: the resolved configuration.
        task: model, datasets and checkpoint record from the training mode.
        cohort: the validated cohort (class names, patient ids for the prediction tables).
        out: run folder.
        ctx: rank and device.
        callbacks: called with each :class:`EpochResult` on every rank.
    """

    def __init__(self, cfg: TrainConfig, task: TrainingTask, cohort: Cohort, out: Path, ctx: DistContext,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.task, self.cohort, self.out, self.ctx = cfg, task, cohort, Path(out), ctx
        self.callbacks = list(callbacks)
        self.class_names = list(cohort.class_names)
        self.model = task.model.to(ctx.device)
        self.progress = Progress()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.runlog: RunLog | None = None
        self.calibration: dict[str, Any] | None = None
        self.operating_point: dict[str, Any] | None = None  # chosen on the validation slides after training

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        cfg, ctx, train = self.cfg, self.ctx, self.task.datasets["train"]
        if len(train) == 0:
            raise ConfigError("no training slides in this split")
        has_last = (self.out / f"{LAST}.json").is_file()
        if has_last and not resume:
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it, or use a new --out")
        self.class_weights = self._class_weights(train)
        self.loss_fn = make_loss(cfg.loss.name, self.class_weights, cfg.loss.focal_gamma,
                                 cfg.loss.label_smoothing).to(ctx.device)
        head = self.model.mil_head()
        self.instance_weight = (head.default_instance_weight if cfg.loss.instance_weight is None
                                else cfg.loss.instance_weight)
        self.instance_k = cfg.loss.instance_k  # None: the head's default
        if self.instance_weight > 0:
            self.model.enable_auxiliary_loss()
        weights = sample_weights_for_balancing(train.labels) if cfg.loss.weighted_sampling else None
        self.sampler = EpochSampler(len(train), cfg.seed, weights, ctx.rank, ctx.world_size)
        self._preload()
        self.loader = self._loader(train, self.sampler, cfg.data.batch_size)
        self.eval_loaders: dict[str, DataLoader] = {}
        params: list[Any] = (list(self.task.param_groups) if self.task.param_groups
                             else [p for p in self.model.parameters() if p.requires_grad])
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.monitor = self._choose_monitor()
        steps_per_epoch = math.ceil(len(self.loader) / cfg.optim.accumulate)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, steps_per_epoch, self.monitor)
        self.amp = cfg.amp and ctx.device.type == "cuda"
        if cfg.amp and not self.amp:
            log.warning("--amp applies to CUDA only; training in float32 on %s", ctx.device)
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        if has_last:
            self._resume()
        else:
            self.model.prepare(train, ctx)
        self.ddp = wrap_ddp(self.model, ctx) if ctx.distributed else self.model
        if ctx.is_main:
            self._write_run_records()
        self.runlog = RunLog(self.out, ctx.is_main, self.progress.epoch, cfg.log.tensorboard, cfg.log.wandb,
                             cfg.log.project, cfg.log.run_name, cfg.to_dict())

    def _loader(self, dataset: BagDataset, sampler: Any, batch_size: int) -> DataLoader:
        workers = self.cfg.data.workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_bags,
                          num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=self.cfg.data.prefetch if workers > 0 else None,
                          multiprocessing_context=worker_context() if workers > 0 else None,
                          # the workers' base seed comes from this generator, not the global RNG: dropout
                          # then draws the same masks whatever the number of workers
                          generator=torch.Generator().manual_seed(self.cfg.seed),
                          pin_memory=self.ctx.device.type == "cuda")

    def _class_weights(self, train: BagDataset) -> torch.Tensor | None:
        if not self.cfg.loss.class_weights:
            return None
        weights = inverse_frequency_weights(train.labels, len(self.class_names))
        log.info("class weights %s", dict(zip(self.class_names, weights.tolist())))
        return weights

    def _preload(self) -> None:
        if not self.cfg.data.cache:
            return
        for part, dataset in self.task.datasets.items():
            preload = getattr(dataset, "preload", None)
            if preload is not None and len(dataset):
                log.info("caching %d %s bags in memory", len(dataset), part)
                preload()

    def _choose_monitor(self) -> str:
        monitor = self.cfg.optim.monitor
        val = self.task.datasets["val"]
        if monitor in _RANKING and len(val) and len(np.unique(val.labels)) < len(self.class_names):
            log.warning("validation slides lack a class: %s is undefined; monitoring balanced_accuracy", monitor)
            return "balanced_accuracy"
        return monitor

    def _write_run_records(self) -> None:
        save_config(self.cfg, self.out / "train_config.json", class_names=self.class_names,
                    checkpoint_meta={k: v for k, v in self.task.meta.items() if k != "head_config"})
        if self.task.backbone_dir is not None:
            ckpt.copy_backbone(self.task.backbone_dir, self.out / "backbone")

    def _resume(self) -> None:
        base = self.out / LAST
        state = ckpt.load_training_state(base)
        meta = ckpt.read_checkpoint_meta(base)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        kept = self.out / INITS if (self.out / f"{INITS}.json").is_file() else self.out / BEST
        if kept.with_name(kept.name + ".json").is_file():  # every initialisation's kept weights, where one was chosen
            self.best_state, _ = ckpt.load_weights(kept)
        changed = config_changes(meta.get("train_config", {}), self.cfg.to_dict())
        if changed:
            log.warning("resuming with changed settings: %s", changed)
        log.info("resuming %s from epoch %d (kept epoch %d)", self.out, self.progress.epoch, self.progress.best_epoch)

    # --- train ---------------------------------------------------------------------------------
    def train(self) -> None:
        """Epochs until the last one or early stopping; checkpoints after every epoch."""
        p, cfg = self.progress, self.cfg.optim
        if p.finished:
            log.info("%s: training already finished (epoch %d); evaluating the best checkpoint", self.out, p.epoch)
        while not p.finished and p.epoch < cfg.epochs:
            start = time.perf_counter()
            epoch = p.epoch + 1
            train_loss, n_bags, train_s = self.train_epoch(epoch)
            val, _ = self.evaluate("val")
            improved = self._update_progress(epoch, val)
            self.schedule.epoch_end(val.get(self.monitor) if val else None)
            early = cfg.select == "best" and cfg.patience > 0 and p.bad_epochs >= cfg.patience
            p.finished = p.epoch >= cfg.epochs or early
            if early and p.epoch < cfg.epochs:
                log.info("early stopping: no better validation %s (ties: loss) for %d epochs", self.monitor, p.bad_epochs)
            if cfg.select == "last" and p.finished:
                improved = self._keep_last(epoch)
            result = EpochResult(epoch, train_loss, val, self.schedule.lr, time.perf_counter() - start,
                                 n_bags / max(train_s, 1e-9), improved)
            self._save_epoch(result)
            for callback in self.callbacks:
                callback(self, result)

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over the training bags; returns (mean loss, bags over all ranks, seconds).

        With ``accumulate`` k, gradients of k batches (fewer in the epoch's last group) are averaged
        before each optimisation step.
        """
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        self.model.set_epoch(epoch)
        start, total, count = time.perf_counter(), 0.0, 0.0
        n, k = len(self.loader), self.cfg.optim.accumulate
        bar = tqdm(self.loader, desc=f"epoch {epoch}", unit="step", leave=False,
                   disable=not (self.ctx.is_main and self.cfg.log.progress) or None)
        for i, batch in enumerate(bar):
            first = i - i % k
            group = min(first + k, n) - first
            loss = self.train_step(batch.to(self.ctx.device, non_blocking=True), i == first,
                                   i == first + group - 1, 1.0 / group)
            total += loss * len(batch.labels)
            count += len(batch.labels)
            bar.set_postfix(loss=f"{loss:.4f}")
        average_batchnorm_statistics(self.model, self.ctx)
        total, count = all_reduce_sum([total, count], self.ctx)
        return total / max(count, 1.0), int(count), time.perf_counter() - start

    def train_step(self, batch: Any, first: bool = True, last: bool = True, scale: float = 1.0) -> float:
        """Forward and backward of one batch (loss x ``scale``); on the ``last`` batch of an
        accumulation group also clip (an ensemble's members each on their own) and step. Returns the batch
        loss (an ensemble's: its members' mean)."""
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        ddp = self.ddp if isinstance(self.ddp, DistributedDataParallel) else None
        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()  # all-reduce once
        with sync:
            with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp):
                out = self.ddp(batch)
            logits = out.logits if out.member_logits is None else out.member_logits
            loss = self.training_loss(logits.float(), batch)
            self.scaler.scale(loss * scale if scale != 1.0 else loss).backward()
        reported = float(loss.detach()) / (1 if out.member_logits is None else len(out.member_logits))
        if not last:
            return reported
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            for params in self.model.clip_groups():
                torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return reported

    def training_loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """The bag loss, plus the head's auxiliary term (max-instance, CLAM's clustering...) weighted by
        ``loss.instance_weight`` (the head's default when unset) where the head has one.

        ``logits`` (B, C), or (K, B, C) for an ensemble's members: then the loss is the sum of the members'
        losses (the head's auxiliary term is their sum too), so each member gets exactly the gradient it
        would get alone; the training loss logged is the members' mean (:meth:`train_step`)."""
        if logits.dim() == 3:
            loss = torch.stack([self.loss_fn(member, batch.labels) for member in logits]).sum()
        else:
            loss = self.loss_fn(logits, batch.labels)
        if self.instance_weight > 0:
            weights = None if self.class_weights is None else self.class_weights.to(logits.device)
            aux = self.model.auxiliary_loss(batch.labels, self.instance_k, weights)
            if aux is not None:
                loss = loss + self.instance_weight * aux.float()
        return loss

    def _update_progress(self, epoch: int, val: dict[str, Any] | None) -> bool:
        """Track the best validation epoch; with ``select: best`` its weights become the kept ones.
        Returns whether this epoch's weights are now the kept ones."""
        p = self.progress
        p.epoch = epoch
        if val is None:
            improved = True
        else:
            value, loss = val.get(self.monitor), val.get("loss")
            improved = is_better(self.monitor, value, p.best_value) or (
                value == p.best_value and is_better("loss", loss, p.best_loss))
            if improved:
                p.best_value, p.best_loss = value, loss
        if improved:
            p.bad_epochs = 0
        else:
            p.bad_epochs += 1
        if self.cfg.optim.select != "best":
            return False
        if improved:
            p.best_epoch = epoch
            self.best_state = self.model.checkpoint_state()
        return improved

    def _keep_last(self, epoch: int) -> bool:
        """``select: last``: the final epoch's weights are the kept ones (written as ``checkpoint_best``)."""
        self.progress.best_epoch = epoch
        self.best_state = self.model.checkpoint_state()
        return True

    # --- evaluate ------------------------------------------------------------------------------
    def _eval_outputs(self, part: str) -> Iterator[tuple[Any, MILOutput]]:
        """``(batch, output)`` of this rank's share of the slides of ``part``, one slide per batch (eval mode)."""
        dataset = self.task.datasets[part]
        self.model.eval()
        if part not in self.eval_loaders:
            self.eval_loaders[part] = self._loader(dataset, shard(len(dataset), self.ctx), 1)
        for batch in self.eval_loaders[part]:
            batch = batch.to(self.ctx.device, non_blocking=True)
            with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp):
                out = self.model(batch)
            yield batch, out

    @torch.no_grad()
    def predict(self, part: str) -> list[tuple[int, np.ndarray, np.ndarray, float]]:
        """``(index, logits (C), probabilities (C), loss)`` of every slide of ``part``, in dataset order."""
        mine = []
        for batch, out in self._eval_outputs(part):
            logits = out.logits.float()
            loss = float(self.loss_fn(logits, batch.labels))
            mine.append((int(batch.indices[0]), logits[0].cpu().numpy(), torch.softmax(logits, -1)[0].cpu().numpy(),
                         loss))
        return sorted((r for rank_rows in all_gather_objects(mine, self.ctx) for r in rank_rows), key=lambda r: r[0])

    @torch.no_grad()
    def member_losses(self, part: str) -> np.ndarray:
        """An ensemble head's members' mean loss (bag loss, as ``predict``) over the slides of ``part``: (K,)."""
        mine = []
        for batch, out in self._eval_outputs(part):
            if out.member_logits is None:
                raise ConfigError("member_losses needs an ensemble head (model.inits > 1)")
            mine.append([float(self.loss_fn(logits.float(), batch.labels)) for logits in out.member_logits])
        rows = [r for rank_rows in all_gather_objects(mine, self.ctx) for r in rank_rows]
        return np.asarray(rows, dtype=np.float64).mean(axis=0)

    def evaluate(self, part: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        """Metrics and per-slide predictions of every slide of ``part`` (None when it is empty)."""
        dataset = self.task.datasets[part]
        if len(dataset) == 0:
            return None, None
        rows = self.predict(part)
        probs = np.stack([r[2] for r in rows]).astype(np.float64)
        metrics = compute_metrics(dataset.labels, probs, self.class_names, loss=float(np.mean([r[3] for r in rows])))
        return metrics, self._prediction_frame(dataset, probs, part)

    def _prediction_frame(self, dataset: BagDataset, probs: np.ndarray, part: str) -> pd.DataFrame:
        frame = pd.DataFrame({"slide_id": dataset.slide_ids, "label": dataset.labels, "pred": probs.argmax(1)})
        for c, name in enumerate(self.class_names):
            frame[f"prob_{name}"] = probs[:, c]
        frame["split"] = part
        if "patient_id" in self.cohort.table.columns:
            frame["patient_id"] = self.cohort.table.loc[dataset.slide_ids, "patient_id"].to_numpy()
        return frame

    # --- save ----------------------------------------------------------------------------------
    def checkpoint_meta(self, epoch: int, metrics: dict[str, Any] | None,
                        weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The checkpoint JSON of ``weights`` saved after ``epoch``."""
        return {**self.task.meta, **self.model.checkpoint_meta(weights), "epoch": epoch, "metrics": metrics or {},
                "class_names": self.class_names, "train_config": self.cfg.to_dict(), "monitor": self.monitor}

    def _save_epoch(self, result: EpochResult) -> None:
        rngs = all_gather_objects(rng_state(), self.ctx)
        if self.ctx.is_main:
            with ckpt.deferred_termination():
                self._write_epoch(result, rngs)

    def _write_epoch(self, result: EpochResult, rngs: list[Any]) -> None:
        weights = self.model.checkpoint_state()
        meta = self.checkpoint_meta(result.epoch, result.val, weights)
        if result.improved:
            ckpt.save_checkpoint(self.out / BEST, weights, meta)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                 "progress": asdict(self.progress), "rng": rngs}
        ckpt.save_checkpoint(self.out / LAST, weights, meta, state)
        val = {f"val_{k}": v for k, v in flat_metrics(result.val or {}).items() if k != "n"}
        assert self.runlog is not None
        self.runlog.epoch({"epoch": result.epoch, "train_loss": result.train_loss, **val, "lr": result.lr,
                           "seconds": round(result.seconds, 3), "bags_per_s": round(result.bags_per_s, 2)})
        log.info("epoch %d/%d: train loss %.4f, val %s %s, %.1f bags/s%s", result.epoch, self.cfg.optim.epochs,
                 result.train_loss, self.monitor, _fmt((result.val or {}).get(self.monitor)), result.bags_per_s,
                 " (kept)" if result.improved else "")

    # --- test ----------------------------------------------------------------------------------
    def use_best(self) -> None:
        """Put the best checkpoint's weights into the model (exactly the weights ``load_head`` gives)."""
        if self.best_state is not None:
            self.model.load_checkpoint_state(self.best_state)

    def test(self) -> RunResult:
        """Evaluate the best checkpoint on validation and test slides and write the test outputs."""
        self.use_best()
        val, val_pred = self.evaluate("val")
        test, test_pred = self.evaluate("test")
        best = self.progress.best_epoch
        if self.ctx.is_main:
            if val_pred is not None:
                _write_csv(val_pred, self.out / "val_predictions.csv")
            if test is None:
                log.warning("no test slides: no test_metrics.json")
            else:
                extra = {"temperature": self.calibration["temperature"]} if self.calibration else {}
                if self.operating_point is not None and test_pred is not None:
                    extra.update(self._operating_figures(test_pred))
                write_json(self.out / "test_metrics.json", {**test, "best_epoch": best, **extra})
                _write_csv(test_pred, self.out / "test_predictions.csv")
                assert self.runlog is not None
                self.runlog.final({k: v for k, v in flat_metrics(test).items() if k != "n"}, best, "test/")
                log.info("test (kept epoch %d): %s", best, ", ".join(
                    f"{k} {_fmt(test.get(k))}" for k in ("auc", "balanced_accuracy", "accuracy", "loss")))
        return RunResult(self.out, best, val or {}, test or {})

    def _operating_figures(self, frame: pd.DataFrame) -> dict[str, Any]:
        """Test figures at the operating point; adds ``pred_at_threshold`` to ``frame``."""
        op = self.operating_point
        assert op is not None
        probs = frame[[f"prob_{c}" for c in self.class_names]].to_numpy(np.float64)
        frame["pred_at_threshold"] = predict_index(probs, op)
        ba = balanced_accuracy_at(probs[:, op["class_index"]], frame["label"].to_numpy() == op["class_index"],
                                  op["threshold"]) if frame["label"].nunique() > 1 else float("nan")
        return {"threshold": op["threshold"], "balanced_accuracy_at_threshold": ba,
                "operating_point": {**op, "test_balanced_accuracy": ba}}

    def cleanup(self) -> None:
        """Stop worker processes and close the run's logs."""
        self.loader, self.eval_loaders = None, {}  # type: ignore[assignment]
        if self.runlog is not None:
            self.runlog.close()
            self.runlog = None


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
