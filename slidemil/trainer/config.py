"""Settings of ``slidemil train``: one frozen dataclass tree, loaded from YAML + command line.

The resolved tree is written beside every run (``train_config.json``) and into every checkpoint.
End-to-end training (issue 5) adds its settings to these same blocks; ``data.mode`` picks the
training mode registered in :mod:`slidemil.trainer.modes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slidemil import config as _config
from slidemil.errors import ConfigError
from slidemil.trainer.metrics import monitor_mode

SCHEDULERS = ("cosine", "plateau", "none")
AMP_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class DataConfig:
    """Where the slides come from and how bags are drawn.

    Attributes:
        metadata: CSV ``slide_id,label[,patient_id][,split]``.
        features: features folder of ``slidemil extract`` (``features/<slide_id>.h5``, ``backbone/``).
        mode: training mode (``features``; ``end2end`` is added by the end-to-end issue).
        class_names: class order and display names; empty: from the labels.
        skip_missing: drop slides whose feature file is missing or unreadable (with a warning).
        max_patches: tiles drawn at random per bag and step at train time; None: all tiles.
        batch_size: bags per optimisation step and process (the effective batch is this x ranks).
        workers: DataLoader worker processes (0: load in the training process).
        cache: keep every bag in memory after the first read (when the cohort fits).
        split_fractions: train/val/test shares of the seeded split when the table has no ``split``.
        val_fraction: share of each cross-validation fold's non-test slides used for validation.
    """

    metadata: str = ""
    features: str = ""
    mode: str = "features"
    class_names: tuple[str, ...] = ()
    skip_missing: bool = False
    max_patches: int | None = 512
    batch_size: int = 1
    workers: int = 0
    cache: bool = False
    split_fractions: tuple[float, ...] = (0.6, 0.2, 0.2)
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_patches is not None and self.max_patches < 1:
            raise ConfigError(f"max_patches must be >= 1 or None (all tiles), got {self.max_patches}")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError(f"need batch_size >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")


@dataclass(frozen=True)
class ModelConfig:
    """The attention-MIL head (see :class:`slidemil.models.mil.HeadConfig`).

    Attributes:
        standardize: standardise each feature with its training-set mean and std (features mode;
            folded into the head's first layer in every checkpoint, so the saved head takes raw
            features).
    """

    mil: str = "gated"
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    standardize: bool = True


@dataclass(frozen=True)
class LossConfig:
    """Loss and class imbalance.

    Attributes:
        name: ``ce`` or ``focal`` (names in :data:`slidemil.trainer.losses.LOSSES`).
        focal_gamma: focusing parameter of the focal loss.
        class_weights: weight classes by inverse frequency in the training split.
        weighted_sampling: draw training bags so that each class is drawn equally often.
        label_smoothing: target smoothing in [0, 1).
    """

    name: str = "ce"
    focal_gamma: float = 2.0
    class_weights: bool = False
    weighted_sampling: bool = False
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and early stopping.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``cosine`` (to ``min_lr_ratio`` x lr), ``plateau`` (x ``plateau_factor`` after
            ``plateau_patience`` epochs without improvement of ``monitor``) or ``none``.
        warmup_epochs: linear warm-up from lr/steps, counted in optimisation steps.
        epochs: maximum number of epochs.
        grad_clip: maximum gradient norm; 0 disables clipping.
        patience: stop after this many epochs without improvement of ``monitor``; 0 disables.
        monitor: validation metric that picks the best checkpoint (ties broken by validation loss).
        min_lr_ratio: floor of the cosine schedule, relative to ``lr``.
    """

    lr: float = 5e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    epochs: int = 40
    grad_clip: float = 1.0
    patience: int = 12
    monitor: str = "auc"
    min_lr_ratio: float = 0.01
    plateau_patience: int = 4
    plateau_factor: float = 0.5

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler {self.scheduler!r}: choose one of {list(SCHEDULERS)}")
        if self.lr <= 0 or self.epochs < 1 or self.warmup_epochs < 0 or self.patience < 0:
            raise ConfigError("need lr > 0, epochs >= 1, warmup_epochs >= 0 and patience >= 0")
        monitor_mode(self.monitor)  # raises ConfigError for a metric that cannot be monitored


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation: ``folds`` >= 2 runs k-fold; ``fold`` runs only that fold (SLURM arrays)."""

    folds: int = 0
    fold: int | None = None

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds must be 0 (no cross-validation) or >= 2, got {self.folds}")
        if self.fold is not None and not 0 <= self.fold < max(self.folds, 1):
            raise ConfigError(f"fold {self.fold} needs --folds K with 0 <= fold < K (got folds={self.folds})")


@dataclass(frozen=True)
class LogConfig:
    """Run logging: TensorBoard always (rank 0), Weights & Biases optionally."""

    tensorboard: bool = True
    wandb: bool = False
    project: str = "slidemil"
    run_name: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        threads: torch intra-op threads per process on CPU; None: torch's default (all cores, or
            ``OMP_NUM_THREADS``; torchrun sets it to 1 per rank). On a CPU shared with other jobs
            use 1: small heads lose more to thread synchronisation than they gain.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool = False
    amp_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r}: choose auto, cpu or cuda")
        if self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"amp_dtype {self.amp_dtype!r}: choose one of {list(AMP_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form (as written to ``train_config.json`` and checkpoints)."""
        return _config.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        return _config.from_dict(cls, data)
