"""Multiple-instance learning heads: their settings, their interface, their registry, and the ABMIL heads.

A bag is the set of tile features of one slide. Every head maps a batch of bags (B, N, D) and a mask
(B, N) to a :class:`MILOutput`: bag logits, one attention weight per tile (what the heatmap shows) and,
for heads that have one per class, an attention map per class. Padded instances (``mask`` False) get
attention exactly zero and never change the result.

The heads (``--mil``, :func:`list_heads`):

- ``gated``, ``simple``: attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), below;
- ``clam_sb``, ``clam_mb``: CLAM (Lu et al., Nat. Biomed. Eng. 2021), :mod:`slidemil.models.clam`;
- ``dsmil``: dual-stream MIL (Li, Li and Eliceiri, CVPR 2021), :mod:`slidemil.models.dsmil`;
- ``transmil``: TransMIL (Shao et al., NeurIPS 2021), :mod:`slidemil.models.transmil`.

Each head starts with the same instance projection ``projection`` (Linear, ReLU, Dropout), the one
layer that sees raw features (the trainer folds its feature standardisation into it), divides its
logits by a ``temperature`` buffer (1 until calibrated), and may add a training-only term to the
loss (:meth:`MILHead.auxiliary_loss`: CLAM's instance clustering, DSMIL's and ABMIL's max-instance
term). ``HeadConfig.ensemble`` > 1 trains that many heads of one kind side by side and averages them
(:mod:`slidemil.models.ensemble`). :class:`BagHead` is the one-bag module exported as ``head.onnx``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from slidemil import config
from slidemil.choices import CONTRAST_HEADS
from slidemil.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    """Settings of a MIL head (recorded in checkpoints, ``torch/head_config.json`` and the manifest).

    Attributes:
        mil_type: the head's name (one of ``list_heads()``).
        in_dim: feature width D of the backbone.
        n_classes: number of classes C (>= 2; probabilities are a softmax).
        hidden_dim: width of the instance projection (TransMIL's token width).
        attention_dim: width of the attention network (DSMIL: of its query).
        dropout: dropout after the projection (training only).
        n_heads: TransMIL: attention heads per layer (``hidden_dim`` must be a multiple).
        landmarks: TransMIL: landmarks of the Nyström attention (the paper's hidden_dim / 2; memory and
            time are linear in the number of tiles for a fixed number of landmarks, and the pseudo-inverse
            costs landmarks^3 per head: 256 landmarks train 5x slower than 128 on a CPU).
        pinv_iterations: TransMIL: iterations of the Moore-Penrose pseudo-inverse.
        ensemble: heads of this kind trained side by side and averaged into one prediction
            (:mod:`slidemil.models.ensemble`); 1: a single head.
        slide_contrast: ABMIL (``gated``, ``simple``): classify each slide by how its attended tiles differ
            from its own mean tile (the pooled embedding minus the bag's mean embedding), and score the
            max-instance term on each tile's logits relative to its bag's mean; what every tile of a slide
            shares (stain, scanner, patient) then cannot carry the prediction (README, "Slide contrast").
        member_contrast: an ensemble of ABMIL heads of both kinds: ``slide_contrast`` of each member (as many
            as ``ensemble``; ``slide_contrast`` is then false); empty: every member follows ``slide_contrast``.
            The trainer's ``slide_contrast: auto`` trains such ensembles and keeps one member.

    The TransMIL fields, ``ensemble``, ``slide_contrast`` and ``member_contrast`` have defaults, so records written
    before they existed still load.
    """

    mil_type: str = "gated"
    in_dim: int = 1024
    n_classes: int = 2
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    n_heads: int = 8
    landmarks: int = 128
    pinv_iterations: int = 6
    ensemble: int = 1
    slide_contrast: bool = False
    member_contrast: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        _load_heads()
        if self.mil_type not in _HEADS:
            raise ConfigError(f"unknown mil_type {self.mil_type!r}; choose one of {list_heads()}")
        for name in ("in_dim", "hidden_dim", "attention_dim", "n_heads", "landmarks", "pinv_iterations", "ensemble"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ConfigError(f"HeadConfig.n_classes must be >= 2 (binary = 2 classes), got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"HeadConfig.dropout must be in [0, 1), got {self.dropout}")
        if (self.slide_contrast or any(self.member_contrast)) and self.mil_type not in CONTRAST_HEADS:
            raise ConfigError(f"slide_contrast is an option of the ABMIL heads (gated, simple), not {self.mil_type}")
        if self.member_contrast and (len(self.member_contrast) != self.ensemble or self.slide_contrast):
            raise ConfigError(f"HeadConfig.member_contrast must name each of the {self.ensemble} members (and "
                              f"slide_contrast be false), got {list(self.member_contrast)}")
        if self.mil_type == "transmil" and self.hidden_dim % self.n_heads:
            raise ConfigError(f"transmil: hidden_dim {self.hidden_dim} must be a multiple of n_heads {self.n_heads}")

    def contrast_per_member(self) -> tuple[bool, ...]:
        """Slide contrast of each of the ``ensemble`` heads."""
        return self.member_contrast or (self.slide_contrast,) * self.ensemble

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError, missing ones take their defaults."""
        return config.from_dict(cls, data)


class MILOutput(NamedTuple):
    """Output of a head for a batch of B bags of N instances."""

    logits: torch.Tensor  # (B, C), divided by the temperature
    attention: torch.Tensor  # (B, N) weights; 0 on padding; each row sums to 1 (per-class heads: the predicted class's)
    attention_raw: torch.Tensor  # (B, N) scores; softmax(attention_raw) == attention; -inf on padding
    attention_per_class: torch.Tensor | None = None  # (B, C, N) one map per class (heads that have them), else None
    member_logits: torch.Tensor | None = None  # (K, B, C) an ensemble's members' logits (each in the bag loss)


class MILHead(nn.Module):
    """What every head is: features (B, N, D) [+ mask (B, N)] -> :class:`MILOutput`.

    Class attributes a head sets:
        per_class_attention: the head has one attention map per class (``MILOutput.attention_per_class``
            and the ``attention_per_class`` output of ``head.onnx``).
        default_instance_weight: weight of :meth:`auxiliary_loss` in the training loss when the
            configuration does not set one (``loss.instance_weight``).
        default_instance_k: tiles per bag the auxiliary term looks at (``loss.instance_k``).
    """

    config: HeadConfig | None = None  # set by create_head, for exporters and checkpoints
    temperature: torch.Tensor  # buffer, () float: divides the logits (1 until calibrated)
    per_class_attention = False
    default_instance_weight = 0.0
    default_instance_k = 1
    input_layer = "projection.0"  # the Linear that takes the raw features

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.register_buffer("temperature", torch.tensor(1.0))  # set by calibration; saved with the head
        self.keep_for_loss = False  # set by the trainer when the auxiliary term is in the loss
        self._kept: dict[str, torch.Tensor] | None = None

    @property
    def input_layers(self) -> tuple[str, ...]:
        """Every Linear that takes the raw features (an ensemble has one per member)."""
        return (self.input_layer,)

    def independent_parameters(self) -> list[list[nn.Parameter]]:
        """Parameter sets that learn independently of each other (an ensemble's members), each clipped on its
        own by the trainer; empty for a single head."""
        return []

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The head's own training term for the bags of its last training forward (None: it has none).

        Only after a forward in training mode with ``keep_for_loss`` set; the kept tensors are released.

        Args:
            labels: int64 (B,) bag labels.
            k: tiles per bag the term looks at (None: ``default_instance_k``).
            class_weights: optional (C,) weights, as in the bag loss.
        """
        self._kept = None
        return None

    def _keep(self, **tensors: torch.Tensor) -> None:
        """Keep what :meth:`auxiliary_loss` needs, in a training forward only."""
        self._kept = tensors if self.keep_for_loss and self.training and torch.is_grad_enabled() else None

    def _take(self) -> dict[str, torch.Tensor]:
        kept, self._kept = self._kept, None
        if kept is None:
            raise RuntimeError(f"{type(self).__name__}.auxiliary_loss needs keep_for_loss = True and a training forward")
        return kept

    def _check_inputs(self, features: torch.Tensor, mask: torch.Tensor | None) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # traced shapes are tensors
            return
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"features must be (B, N, {self.in_dim}), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if mask is None:
            return
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(f"mask must be bool {tuple(features.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one real instance (a row of mask is all False)")


def projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The instance projection every head starts with: Linear, ReLU, Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


def masked_scores(raw: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with -inf on padding and their softmax over the instances (exactly 0 on padding).

    ``raw`` is (B, N) or (B, K, N) with ``dim=-1``; ``mask`` (B, N).
    """
    if mask is not None:
        m = mask if raw.dim() == mask.dim() else mask.unsqueeze(1)
        raw = raw.masked_fill(~m, float("-inf"))
    return raw, torch.softmax(raw, dim=dim)


def predicted_class_map(per_class: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, C, N) maps -> (B, N): the map of each bag's predicted class (argmax of the logits)."""
    index = logits.argmax(dim=-1)  # (B,)
    return per_class.gather(1, index[:, None, None].expand(-1, 1, per_class.shape[-1])).squeeze(1)


class AttentionMIL(MILHead):
    """Attention-MIL head (ABMIL): project each instance, score it with a simple (tanh) or gated
    (tanh * sigmoid) attention network, pool the instances by the softmax of the scores, and
    classify the pooled vector.

    Its auxiliary term is the max-instance loss (:func:`max_instance_loss`): per class, the
    ``k`` tiles of a bag that the head's own classifier scores highest must give the bag's label too.

    Args:
        in_dim: feature width D.
        n_classes: number of classes C.
        hidden_dim: projection width.
        attention_dim: attention network width.
        dropout: dropout after the projection.
        gated: gated attention (tanh * sigmoid) if True, else simple (tanh).
        contrast: slide contrast (:attr:`HeadConfig.slide_contrast`): the classifier sees the pooled
            embedding minus the bag's mean embedding, so the bag logits are the attention-weighted mean of
            the tiles' logits relative to the mean tile, and the max-instance term ranks tiles by their logits
            relative to their bag's mean.
    """

    default_instance_weight = 1.0  # README, Benchmarks, "MIL heads on small lesions": 6 of 8 small-lesion runs on target, 4 at 0.5
    default_instance_k = 1

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, gated: bool = True, contrast: bool = False) -> None:
        super().__init__(in_dim, n_classes)
        self.gated, self.contrast = gated, contrast
        self.projection = projection(in_dim, hidden_dim, dropout)
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Score bags.

        Args:
            features: float (B, N, D).
            mask: bool (B, N), True for real instances; None when no bag is padded.

        Returns:
            MILOutput(logits (B, C), attention (B, N), attention_raw (B, N)).
        """
        self._check_inputs(features, mask)
        h = self.projection(features)  # (B, N, hidden)
        a = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            a = a * torch.sigmoid(self.attention_u(h))
        raw, weights = masked_scores(self.attention_w(a).squeeze(-1), mask)  # (B, N), 0 where raw = -inf
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding never leaks in, even as NaN
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (B, hidden)
        if self.contrast:
            pooled = pooled - bag_mean(h, mask)  # what every tile of the slide shares cancels
        logits = self.classifier(pooled) / self.temperature
        self._keep(h=h, mask=_full_mask(features, mask))
        return MILOutput(logits, weights, raw)

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Per-tile logits (B, N, C) of the head's own classifier.

        The classifier is linear and the attention weights sum to 1, so the bag logits are exactly
        the attention-weighted mean of these: they need no parameters of their own, and the
        exported head stays as it is. With slide contrast each tile's embedding is taken relative to
        its bag's mean (features of one unpadded bag per row).
        """
        h = self.projection(features)
        if self.contrast:
            h = h - bag_mean(h, None).unsqueeze(1)
        return self.classifier(h) / self.temperature

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The max-instance term on the head's per-tile logits."""
        kept = self._take()
        instance_logits = self.classifier(kept["h"]) / self.temperature
        return max_instance_loss(instance_logits.float(), kept["mask"], labels, k or self.default_instance_k,
                                 class_weights, relative=self.contrast)


def bag_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, F) -> (B, F): the mean over each bag's real instances (``mask`` (B, N); None: all)."""
    if mask is None:
        return x.mean(dim=1)
    # masked_fill, not a product with the mask: padding may hold NaN
    return x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1) / mask.sum(dim=1, keepdim=True).to(x.dtype)


def _full_mask(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return mask if mask is not None else torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)


def max_instance_loss(instance_logits: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, k: int = 1,
                      class_weights: torch.Tensor | None = None, relative: bool = False) -> torch.Tensor:
    """Max-pooling multiple-instance loss on per-tile logits (the mi-Net rule of MIL).

    For each bag and class, the mean logit of the bag's ``k`` tiles that score highest for that
    class stands for the bag; cross-entropy of these (B, C) pooled logits against the bag labels.
    A negative bag thus pushes its most tumour-like tiles down, and a positive bag its most
    tumour-like tiles up, with the full gradient on those few tiles, where the attention-weighted
    bag logit spreads it over the whole bag at first. ``k`` is capped at the smallest bag.

    Args:
        instance_logits: float (B, N, C).
        mask: bool (B, N), True for real tiles.
        labels: int64 (B,).
        k: tiles pooled per class.
        class_weights: optional (C,) weights, as in the bag loss.
        relative: rank and pool each tile's logits minus its bag's mean logits (slide contrast): a
            slide-wide shift of the logits then changes nothing, only tiles that stand out from their slide.
    """
    assert instance_logits.ndim == 3 and mask.shape == instance_logits.shape[:2], (instance_logits.shape, mask.shape)
    k = max(1, min(k, int(mask.sum(dim=1).min())))
    if relative:
        instance_logits = instance_logits - bag_mean(instance_logits, mask).unsqueeze(1)
    scores = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    pooled = scores.topk(k, dim=1).values.mean(dim=1)  # (B, C)
    return nn.functional.cross_entropy(pooled, labels, weight=class_weights)


class BagHead(nn.Module):
    """One bag, no batch axis: the module exported as ``head.onnx`` and run by the engine.

    forward(features (N, D)) -> logits (C), probabilities (C), attention (N), attention_raw (N)
    [, attention_per_class (C, N) for heads with one map per class]: see :attr:`output_names`.
    Inference only: it starts in eval mode (and puts ``head`` in eval mode).
    """

    def __init__(self, head: MILHead) -> None:
        super().__init__()
        self.head = head
        self.eval()

    @property
    def output_names(self) -> tuple[str, ...]:
        """The names of the outputs, in order."""
        return head_outputs(self.head.per_class_attention)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, D) float -> logits (C), probabilities (C), attention (N), attention_raw (N)[, per class (C, N)]."""
        if features.dim() != 2:
            raise ValueError(f"features must be (N, D) for one bag, got {tuple(features.shape)}")
        out = self.head(features.unsqueeze(0))
        logits = out.logits[0]
        outputs: tuple[torch.Tensor, ...] = (logits, torch.softmax(logits, dim=-1), out.attention[0],
                                             out.attention_raw[0])
        if self.head.per_class_attention:
            assert out.attention_per_class is not None
            outputs = (*outputs, out.attention_per_class[0])
        return outputs


HEAD_OUTPUTS = ("logits", "probabilities", "attention", "attention_raw")
PER_CLASS_OUTPUT = "attention_per_class"


def head_outputs(per_class: bool) -> tuple[str, ...]:
    """Output names of ``head.onnx``: the four every head has, and ``attention_per_class`` where it has one."""
    return (*HEAD_OUTPUTS, PER_CLASS_OUTPUT) if per_class else HEAD_OUTPUTS


HeadBuilder = Callable[[HeadConfig], MILHead]
_HEADS: dict[str, HeadBuilder] = {}


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator registering a builder ``(HeadConfig) -> MILHead`` under ``name``."""
    def decorator(fn: HeadBuilder) -> HeadBuilder:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = fn
        return fn
    return decorator


def _load_heads() -> None:
    """Import the modules that register the other heads (they import this module)."""
    import slidemil.models.clam  # noqa: F401
    import slidemil.models.dsmil  # noqa: F401
    import slidemil.models.transmil  # noqa: F401


def list_heads() -> list[str]:
    """Registered mil_type names."""
    _load_heads()
    return sorted(_HEADS)


def _head_args(cfg: HeadConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("in_dim", "n_classes", "hidden_dim", "attention_dim", "dropout")}


@register_head("gated")
def gated_attention(cfg: HeadConfig) -> AttentionMIL:
    """Gated attention: w = W(tanh(V h) * sigmoid(U h))."""
    return AttentionMIL(**_head_args(cfg), gated=True, contrast=cfg.slide_contrast)


@register_head("simple")
def simple_attention(cfg: HeadConfig) -> AttentionMIL:
    """Simple attention: w = W tanh(V h)."""
    return AttentionMIL(**_head_args(cfg), gated=False, contrast=cfg.slide_contrast)


def create_head(cfg: HeadConfig) -> MILHead:
    """Build the head named by ``cfg.mil_type`` (an :class:`~slidemil.models.ensemble.EnsembleHead` of
    ``cfg.ensemble`` of them when above 1); its initialisation follows the torch seed."""
    _load_heads()
    if cfg.ensemble == 1:
        head = _HEADS[cfg.mil_type](cfg)
    else:
        from slidemil.models.ensemble import EnsembleHead

        head = EnsembleHead([create_head(dataclasses.replace(cfg, ensemble=1, member_contrast=(), slide_contrast=c))
                             for c in cfg.contrast_per_member()])
    head.config = cfg
    return head
