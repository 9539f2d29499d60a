"""Settings of ``slidemil train``: one frozen dataclass tree, loaded from YAML + command line.

The resolved tree is written beside every run (``train_config.json``) and into every checkpoint.
``data.mode`` picks the training mode registered in :mod:`slidemil.trainer.modes`: ``features``
(a head on cached features) or ``end2end`` (backbone and head on tiles read from the slides, with
the ``backbone`` and ``augment`` blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slidemil import config as _config
from slidemil.choices import (
    CONTRAST_HEADS,
    AmpDtype,
    BatchNormMode,
    InitChoice,
    LossName,
    MilType,
    Scheduler,
    SelectRule,
    SlideContrast,
    TrainingMode,
)
from slidemil.errors import ConfigError
from slidemil.evaluation.metrics import monitor_mode


@dataclass(frozen=True)
class DataConfig:
    """Where the slides come from and how bags are drawn.

    Attributes:
        metadata: CSV ``slide_id,label[,patient_id][,split][,path]``.
        features: features folder of ``slidemil extract`` (``features/<slide_id>.h5``, ``backbone/``).
        mode: training mode: ``features`` or ``end2end``.
        coords: end2end: output folder of ``slidemil tile`` (``coords/<slide_id>.h5``, ``tiling_config.json``).
        slides: end2end: the slide files (folder, glob or CSV ``slide_id,path[,mpp]``); empty: a
            ``path`` column of the metadata, else the slides the coords folder was tiled from.
        class_names: class order and display names; empty: from the labels.
        skip_missing: drop slides whose feature file is missing or unreadable (with a warning).
        max_patches: tiles drawn at random per bag and step at train time; None: all tiles.
        eval_patches: end2end: tiles per validation/test slide, a fixed seeded subset; None: all.
        batch_size: bags per optimisation step and process (the effective batch is this x ranks).
        workers: DataLoader worker processes (0: load in the training process).
        prefetch: batches each worker loads ahead.
        cache: keep every bag in memory after the first read (when the cohort fits).
        split_fractions: train/val/test shares of the seeded split when the table has no ``split``.
        val_fraction: share of each cross-validation fold's non-test slides used for validation.
    """

    metadata: str = ""
    features: str = ""
    mode: TrainingMode = "features"
    coords: str = ""
    slides: str = ""
    class_names: tuple[str, ...] = ()
    skip_missing: bool = False
    max_patches: int | None = 512
    eval_patches: int | None = 1024
    batch_size: int = 1
    workers: int = 0
    prefetch: int = 2
    cache: bool = False
    split_fractions: tuple[float, ...] = (0.6, 0.2, 0.2)
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("max_patches", "eval_patches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or None (all tiles), got {value}")
        if self.batch_size < 1 or self.workers < 0 or self.prefetch < 1:
            raise ConfigError(f"need batch_size >= 1, workers >= 0 and prefetch >= 1, got {self.batch_size}, "
                              f"{self.workers}, {self.prefetch}")


@dataclass(frozen=True)
class ModelConfig:
    """The MIL head (see :class:`slidemil.models.mil.HeadConfig` and ``list_heads()``).

    Attributes:
        mil: the head: ``gated`` or ``simple`` (ABMIL), ``clam_sb``, ``clam_mb``, ``dsmil``, ``transmil``.
        hidden_dim: width of the instance projection (TransMIL: its token width).
        attention_dim: width of the attention network (DSMIL: of its query).
        dropout: dropout after the projection.
        n_heads, landmarks, pinv_iterations: TransMIL's attention heads, Nyström landmarks and
            pseudo-inverse iterations.
        standardize: standardise each feature with its training-set mean and std (features mode;
            folded into the head's first layer in every checkpoint, so the saved head takes raw
            features).
        inits: heads trained side by side on the same split, each from its own initialisation (each
            learns exactly as it would alone; :mod:`slidemil.models.ensemble`); 1: one head. With
            ``slide_contrast: auto`` (ABMIL, ``init_choice: val_loss``) this many of each kind.
        init_choice: what the run keeps of them (:mod:`slidemil.trainer.inits`): ``val_loss``, the head
            with the lowest validation loss at the kept epoch (a head that learnt its training slides by
            slide-wide differences instead of the lesion is confidently wrong on some validation slides);
            ``average``, all of them, exported as one head that averages them.
        slide_contrast: ABMIL only: heads that classify each slide by how its attended tiles differ from
            its own mean tile, so that what all of a slide's tiles share (stain, scanner, patient) cannot carry
            the prediction (:attr:`slidemil.models.mil.HeadConfig.slide_contrast`; README, "Slide contrast").
            ``on``: every head; ``off``: none; ``auto`` (default): with ``inits`` >= 2 and
            ``init_choice: val_loss``, ``inits`` heads of each kind (plain heads first, then as many contrast
            heads), and the validation loss chooses one head of either kind: a contrast head where the
            plain ones learnt the patients instead of a small lesion, a plain one where the class is
            slide-wide (a subtype: a contrast head has little to go on); otherwise (one initialisation,
            their average, other heads) none. :meth:`contrast_per_head` resolves it.
    """

    mil: MilType = "gated"
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    n_heads: int = 8
    landmarks: int = 128
    pinv_iterations: int = 6
    standardize: bool = True
    inits: int = 5
    init_choice: InitChoice = "val_loss"
    slide_contrast: SlideContrast = "auto"

    def __post_init__(self) -> None:
        if self.slide_contrast == "on" and self.mil not in CONTRAST_HEADS:
            raise ConfigError(f"--slide-contrast on is an option of the ABMIL heads: use --mil gated or simple "
                              f"(got {self.mil})")
        if self.inits < 1:
            raise ConfigError(f"model.inits must be >= 1 (heads trained from their own initialisations), got "
                              f"{self.inits}")

    def contrast_per_head(self) -> tuple[bool, ...]:
        """Whether each head trained side by side is a slide-contrast head (resolves ``slide_contrast: auto``):
        ``inits`` heads, or with ``auto`` ``inits`` of each kind."""
        if self.slide_contrast == "on":
            return (True,) * self.inits
        if (self.slide_contrast == "off" or self.mil not in CONTRAST_HEADS or self.inits < 2
                or self.init_choice != "val_loss"):
            return (False,) * self.inits
        return (False,) * self.inits + (True,) * self.inits


@dataclass(frozen=True)
class BackboneConfig:
    """The tile backbone of end-to-end training (``data.mode: end2end``).

    Attributes:
        name: a registered backbone, a timm name, or ``hf-hub:<repo>``.
        weights: ``pretrained`` (timm/hf-hub), ``random``, or a local weights file.
        lr: peak learning rate of the backbone's parameters; None: ``optim.lr``.
        freeze: keep the whole backbone fixed (BatchNorm statistics included); only the head trains.
        freeze_until: freeze the backbone up to and including this module, in the order the model
            defines its parameters (``layer3``: only a ResNet's ``layer4`` trains; ``blocks.9``).
        batchnorm: ``frozen``: BatchNorm layers keep their running statistics (eval mode; their
            scale and shift still train); ``train``: they normalise by the statistics of each batch.
            A batch is one or a few bags, i.e. the tiles of one slide: batch statistics normalise
            away the slide-level differences the head must see and differ from the running
            statistics evaluation uses, so ``frozen`` is the default.
        grad_checkpointing: recompute activations in the backward pass (timm models that support it).
        channels_last: NHWC memory for the convolutions.
        chunk: tiles per backbone forward where no gradient is needed (evaluation).
    """

    name: str = "resnet50_trunc"
    weights: str = "pretrained"
    lr: float | None = None
    freeze: bool = False
    freeze_until: str | None = None
    batchnorm: BatchNormMode = "frozen"
    grad_checkpointing: bool = False
    channels_last: bool = True
    chunk: int = 256

    def __post_init__(self) -> None:
        if (self.lr is not None and self.lr <= 0) or self.chunk < 1:
            raise ConfigError(f"need backbone lr > 0 and chunk >= 1, got {self.lr}, {self.chunk}")


@dataclass(frozen=True)
class AugmentConfig:
    """Tile augmentation of end-to-end training, on the training device (see :mod:`slidemil.trainer.augment`).

    Attributes:
        enabled: augment training tiles (evaluation tiles never are).
        flips: random flips and 90-degree rotations (the 8 symmetries of a square tile).
        brightness, contrast, saturation: jitter factors drawn from ``[1 - s, 1 + s]``.
        hue: hue rotation drawn from ``[-hue, hue]`` turns.
        stain: H&E stain jitter (Tellez et al. 2019): each of the H, E, D channels becomes
            ``s * (1 + a) + b`` with ``a, b`` from ``[-stain, stain]``; 0 disables it (0.05: light).
    """

    enabled: bool = True
    flips: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    stain: float = 0.0

    def __post_init__(self) -> None:
        strengths = (self.brightness, self.contrast, self.saturation, self.stain)
        if min(strengths) < 0 or max(strengths) >= 1 or not 0 <= self.hue <= 0.5:
            raise ConfigError("augmentation strengths must be in [0, 1) and hue in [0, 0.5]")


@dataclass(frozen=True)
class LossConfig:
    """Loss and class imbalance.

    Attributes:
        name: ``ce`` or ``focal`` (names in :data:`slidemil.trainer.losses.LOSSES`).
        focal_gamma: focusing parameter of the focal loss.
        class_weights: weight classes by inverse frequency in the training split.
        weighted_sampling: draw training bags so that each class is drawn equally often.
        label_smoothing: target smoothing in [0, 1).
        instance_weight: weight of the head's own instance-level term added to the bag loss
            (:meth:`slidemil.models.mil.MILHead.auxiliary_loss`); None: the head's default; 0 turns it
            off. ABMIL (``gated``, ``simple``): the max-instance term (each class's logit of a bag's
            ``instance_k`` highest-scoring tiles must give the bag's label too), default 1.0: it gives
            the few tiles of a small lesion their full gradient from the first step, where the bag
            loss dilutes it over the whole bag until the attention has found them (README, "Small
            lesions"). CLAM: the instance clustering loss, default 0.3 / 0.7 (CLAM's bag weight 0.7).
            DSMIL: the instance stream's max-instance loss, default 1 (the paper's equal weights).
            TransMIL has none.
        instance_k: tiles per bag the term looks at; None: the head's default (1; CLAM: 8).
    """

    name: LossName = "ce"
    focal_gamma: float = 2.0
    class_weights: bool = False
    weighted_sampling: bool = False
    label_smoothing: float = 0.0
    instance_weight: float | None = None
    instance_k: int | None = None

    def __post_init__(self) -> None:
        if (self.instance_weight is not None and self.instance_weight < 0) or (
                self.instance_k is not None and self.instance_k < 1):
            raise ConfigError(f"need instance_weight >= 0 and instance_k >= 1, got {self.instance_weight}, "
                              f"{self.instance_k}")


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
        accumulate: batches per optimisation step (gradient accumulation); the effective
            batch is ``batch_size`` x ``accumulate`` x ranks.
        select: which epoch's weights the run keeps as its model (``checkpoint_best``): ``last``, the
            final epoch's, after the schedule has annealed; ``best``, the epoch with the best validation
            ``monitor`` (ties broken by validation loss), with early stopping after ``patience`` epochs.
            ``last`` is the default because a cross-validation fold of a small cohort validates on a
            handful of slides: there a ranking metric reaches 1.0 by chance in the first epochs and
            keeps an untrained head (README, "Which epoch the run keeps"; ``bench/model_selection.py``).
            Validation figures are computed and logged every epoch either way.
        patience: with ``select: best``, stop after this many epochs without improvement of ``monitor``;
            0 disables.
        monitor: validation metric that picks the best checkpoint with ``select: best``, and that the
            ``plateau`` schedule follows.
        min_lr_ratio: floor of the cosine schedule, relative to ``lr``.
    """

    lr: float = 5e-4
    weight_decay: float = 1e-4
    scheduler: Scheduler = "cosine"
    warmup_epochs: int = 1
    epochs: int = 40
    grad_clip: float = 1.0
    accumulate: int = 1
    select: SelectRule = "last"
    patience: int = 12
    monitor: str = "auc"
    min_lr_ratio: float = 0.01
    plateau_patience: int = 4
    plateau_factor: float = 0.5

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.warmup_epochs < 0 or self.patience < 0 or self.accumulate < 1:
            raise ConfigError("need lr > 0, epochs >= 1, warmup_epochs >= 0, patience >= 0 and accumulate >= 1")
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
        amp: mixed precision on CUDA (``amp_dtype`` float16 with loss scaling, or bfloat16).
        calibrate: after training, fit a temperature on the validation slides and store it in the
            best checkpoint's head (see :mod:`slidemil.trainer.calibrate`).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool = False
    amp_dtype: AmpDtype = "float16"
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r}: choose auto, cpu or cuda")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form (as written to ``train_config.json`` and checkpoints)."""
        return _config.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        return _config.from_dict(cls, data)
