"""Tile backbones created by name, each with the preprocessing card that travels with its weights.

``create_backbone(name, weights)`` returns a features-only model, float NCHW (B, 3, H, W) normalised
-> (B, D) float, in eval mode, and a :class:`BackboneCard` saying how to feed it (input size,
mean, std), how to rebuild it (timm name and keyword arguments, JSON-safe) and which weights it
carries (source and sha256). Entries register themselves by name, like timm's ``@register_model``;
any other timm name, or ``hf-hub:<repo>``, passes through to timm.

Weight files are read without unpickling arbitrary objects (safetensors, or
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slidemil import config
from slidemil.atomic import atomic_path, write_json
from slidemil.errors import ConfigError, WeightsError
from slidemil.models.weights import (
    match_state_dict,
    read_state_dict,
    state_dict_sha256,
    strip_common_prefixes,
    unshared,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "backbone.safetensors"
CARD_FILE = "backbone_card.json"
CALLABLE_MARK = "py:"  # a timm kwarg that is a class or factory is stored as "py:<dotted.path>"
_RESOLVABLE_PREFIXES = ("timm.", "torch.nn.")  # the only modules a card may name callables from
_ALIAS_MODULES = ("timm.layers", "torch.nn")  # short public names preferred when encoding


@dataclass(frozen=True)
class BackboneCard:
    """What a backbone is, how to feed it, and which weights it carries (JSON round-trips)."""

    name: str
    timm_name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_source: str
    weights_sha256: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"backbone card {self.name!r}: mean and std need 3 values each")
        object.__setattr__(self, "timm_kwargs", _json_copy(encode_kwargs(self.timm_kwargs)))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneCard:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError."""
        return config.from_dict(cls, data)


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: how to build one backbone with timm.

    Attributes:
        arch: timm name built for random initialisation (and recorded as the card's ``timm_name``).
        pretrained: name given to timm for ``weights="pretrained"``; a timm name with tag or
            ``hf-hub:<repo>``. Defaults to ``arch``.
        timm_kwargs: JSON-safe keyword arguments; classes as ``"py:<dotted.path>"``.
        post: name of a step in ``POST_BUILD`` applied after timm builds the model.
        mean, std, interpolation, input_size: override timm's resolved data config.
        ignore_prefixes: extra state-dict prefixes a weights file may carry that the model lacks.
    """

    arch: str
    pretrained: str | None = None
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    post: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    input_size: int | None = None
    ignore_prefixes: tuple[str, ...] = ()


_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], BackboneSpec]], Callable[[], BackboneSpec]]:
    """Decorator registering an entry function ``() -> BackboneSpec`` under ``name``."""
    def decorator(fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return decorator


def list_backbones() -> list[str]:
    """Names registered by slidemil (any timm name works as well)."""
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered name, or a pass-through spec for a timm or ``hf-hub:`` name."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(name):
        return BackboneSpec(arch=name)
    raise ConfigError(f"unknown backbone {name!r}: use one of {list_backbones()}, a timm model name "
                      "(see timm.list_models()), or 'hf-hub:<repo>'")


# --- entries -------------------------------------------------------------------------------------

@register_backbone("resnet50_trunc")
def resnet50_trunc() -> BackboneSpec:
    """ResNet-50 without layer4, global average pool -> 1024-d: the CLAM/TRIDENT baseline."""
    return BackboneSpec("resnet50", pretrained="resnet50.tv_in1k", post="drop_layer4",
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                        ignore_prefixes=("layer4.",))


# Plain timm models, registered so that list_backbones() shows the supported set.
for _name in ("resnet50", "resnet34", "resnet18", "test_resnet", "test_vit"):
    register_backbone(_name)(functools.partial(BackboneSpec, _name))


@register_backbone("vit_base_patch16_224")
def vit_base_patch16_224() -> BackboneSpec:
    """timm ViT-B/16 at 224 px, 768-d, mean = std = 0.5."""
    return BackboneSpec("vit_base_patch16_224", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# Pathology foundation models. Random initialisation builds ``arch`` with these kwargs, offline;
# "pretrained" asks timm for the hf-hub name, whose config carries the same arguments.
_SWIGLU = {"mlp_layer": "py:timm.layers.SwiGLUPacked", "act_layer": "py:torch.nn.SiLU"}
_IMAGENET: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
FOUNDATION_MODELS: dict[str, BackboneSpec] = {
    "uni": BackboneSpec(  # 1024-d
        "vit_large_patch16_224", "hf-hub:MahmoodLab/uni",
        {"init_values": 1e-5, "dynamic_img_size": True}, **_IMAGENET),
    "uni2_h": BackboneSpec(  # 1536-d
        "vit_giant_patch14_224", "hf-hub:MahmoodLab/UNI2-h",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
         "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, **_SWIGLU,
         "reg_tokens": 8, "dynamic_img_size": True}, **_IMAGENET),
    "virchow2": BackboneSpec(  # class token ++ mean of patch tokens: 2 x 1280 = 2560-d
        "vit_huge_patch14_224", "hf-hub:paige-ai/Virchow2",
        {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
         "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        post="class_and_mean_tokens", **_IMAGENET),
    "h_optimus_0": BackboneSpec(  # 1536-d
        "vit_giant_patch14_reg4_dinov2", "hf-hub:bioptimus/H-optimus-0",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
    "gigapath": BackboneSpec(  # 1536-d
        "vit_giant_patch14_dinov2", "hf-hub:prov-gigapath/prov-gigapath",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334}, **_IMAGENET),
}
for _name, _spec in FOUNDATION_MODELS.items():
    register_backbone(_name)(functools.partial(lambda spec: spec, _spec))


# --- post-build steps (named so that a card can be rebuilt) ---------------------------------------

class ClassAndMeanTokens(nn.Module):
    """Virchow-style embedding: class token ++ mean of patch tokens (register tokens excluded)."""

    def __init__(self, trunk: Any) -> None:  # a timm VisionTransformer (its attributes are not typed)
        super().__init__()
        self.trunk = trunk
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self.num_features = 2 * int(trunk.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2 * embed_dim)."""
        tokens = self.trunk.forward_features(x)  # (B, prefix + patches, D), final norm applied
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


def _drop_layer4(model: Any) -> nn.Module:  # a timm ResNet
    model.layer4 = nn.Identity()
    model.feature_info = model.feature_info[:-1]
    model.num_features = model.feature_info[-1]["num_chs"]
    return model


POST_BUILD: dict[str, Callable[[nn.Module], nn.Module]] = {
    "drop_layer4": _drop_layer4,
    "class_and_mean_tokens": ClassAndMeanTokens,
}


def timm_core(model: nn.Module) -> nn.Module:
    """The timm model inside a backbone (the trunk of a post-build wrapper, else the backbone itself)."""
    return model.trunk if isinstance(model, ClassAndMeanTokens) else model


# --- public factory ------------------------------------------------------------------------------

def create_backbone(name: str, weights: str | Path | None = None,
                    **timm_overrides: Any) -> tuple[nn.Module, BackboneCard]:
    """Build a features-only backbone by name, with its card.

    Args:
        name: a registered name (``list_backbones()``), any timm name, or ``hf-hub:<repo>``.
        weights: ``None`` or ``"random"`` (random init from the caller's torch seed),
            ``"pretrained"`` (timm / hf-hub download; needs network), or a local weights file
            (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).
        **timm_overrides: keyword arguments for ``timm.create_model`` (e.g. ``depth=1``); they
            are recorded in the card.

    Returns:
        ``(model, card)``: model maps (B, 3, H, W) float normalised -> (B, D) float, eval mode.

    Raises:
        ConfigError: unknown name or a setting the card cannot record.
        WeightsError: a weights file is missing, unreadable, or does not fit the model.
    """
    if "num_classes" in timm_overrides:
        raise ConfigError("backbones are features-only (num_classes=0); the MIL head classifies")
    spec = backbone_spec(name)
    kwargs = {**spec.timm_kwargs, **encode_kwargs(timm_overrides)}
    pretrained = weights == "pretrained"
    timm_name = spec.arch
    if weights is None or weights == "random":
        source, model = "random", _build(spec, timm_name, kwargs, pretrained=False)
    elif pretrained:
        hub_name = spec.pretrained or spec.arch
        if not hub_name.startswith(("hf-hub:", "hf_hub:")):
            timm_name = hub_name  # timm name with tag: rebuilds offline with pretrained=False
        source = "hf-hub:" + hub_name.split(":", 1)[1] if ":" in hub_name else "timm-pretrained"
        model = _build(spec, hub_name, kwargs, pretrained=True)
    else:
        path = Path(weights).expanduser().resolve()
        model = _build(spec, timm_name, kwargs, pretrained=False)
        load_weights_file(model, path, spec.ignore_prefixes)
        source = f"file:{path}"
    card = _make_card(name, timm_name, spec, kwargs, model, source)
    log.info("backbone %s (%s): %d-d, weights %s", name, timm_name, card.feature_dim, source)
    return model, card


def rebuild_backbone(card: BackboneCard) -> nn.Module:
    """Random-initialised architecture described by ``card``; the caller loads the weights."""
    spec = _REGISTRY[card.name]() if card.name in _REGISTRY else BackboneSpec(arch=card.timm_name)
    model = _build(spec, card.timm_name, card.timm_kwargs, pretrained=False)
    dim = measure_feature_dim(model, card.input_size)
    if dim != card.feature_dim:
        raise ConfigError(f"backbone card {card.name!r} says {card.feature_dim}-d but "
                          f"{card.timm_name} with {card.timm_kwargs} gives {dim}-d")
    return model


def _build(spec: BackboneSpec, timm_name: str, kwargs: Mapping[str, Any], pretrained: bool) -> nn.Module:
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **decode_kwargs(kwargs))
    except (OSError, RuntimeError, ValueError) as exc:
        if not (pretrained or timm_name.startswith(("hf-hub:", "hf_hub:"))):
            raise
        raise WeightsError(f"cannot fetch {timm_name!r} from timm/hf-hub ({exc}); without network or "
                           "hub access (gated repos need a token), download the weights elsewhere and "
                           "pass the local file as weights") from exc
    if spec.post is not None:
        model = POST_BUILD[spec.post](model)
    return model.eval()


def _make_card(name: str, timm_name: str, spec: BackboneSpec, kwargs: Mapping[str, Any],
               model: nn.Module, source: str) -> BackboneCard:
    data_cfg = timm.data.resolve_model_data_config(timm_core(model))
    patch_embed = getattr(timm_core(model), "patch_embed", None)
    # timm's data config keeps the pretrained size (518 for dinov2) when img_size is overridden
    img_size = getattr(patch_embed, "img_size", None)
    input_size = spec.input_size or int(img_size[0] if img_size else data_cfg["input_size"][-1])
    return BackboneCard(
        name=name, timm_name=timm_name, feature_dim=measure_feature_dim(model, input_size),
        input_size=input_size, mean=spec.mean or data_cfg["mean"], std=spec.std or data_cfg["std"],
        interpolation=spec.interpolation or data_cfg["interpolation"], weights_source=source,
        weights_sha256=state_dict_sha256(model), timm_kwargs=dict(kwargs))


def measure_feature_dim(model: nn.Module, input_size: int) -> int:
    """Feature width from a shape-only (meta-device) forward of one image (no compute, no RNG)."""
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
    image = torch.empty(1, 3, input_size, input_size, device="meta")
    with torch.no_grad():
        try:
            out = torch.func.functional_call(model, meta, (image,))
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel: run it for real
            out = model(torch.zeros(1, 3, input_size, input_size))
    if out.dim() != 2:
        raise ConfigError(f"backbone gives shape {tuple(out.shape)} per batch, not (B, D); "
                          "a timm global_pool='' model needs a pooling post step")
    return int(out.shape[1])


# --- weights: checksum, loading, saving -------------------------------------------------------------

def load_weights_file(model: nn.Module, path: Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load a local weights file into ``model``.

    The state dict may be nested under ``state_dict``/``model``, carry ``module.`` prefixes, and
    carry a classifier head (``fc.``, ``head.``, ``classifier.``) or ``ignore_prefixes`` that the
    model lacks; those are dropped. Any other missing, unexpected or misshapen key is an error.

    Raises:
        WeightsError: naming the first few offending keys.
    """
    state = read_state_dict(path)
    target = timm_core(model)
    state = strip_common_prefixes(state, extra=("trunk.",) if target is not model else ())
    target.load_state_dict(match_state_dict(target, state, ignore_prefixes, path))


def save_backbone(model: nn.Module, card: BackboneCard, folder: str | Path) -> BackboneCard:
    """Write ``backbone.safetensors`` and ``backbone_card.json`` into ``folder``, atomically.

    The card written carries the sha256 of the weights written (it changes after fine-tuning).

    Returns:
        The card as written.
    """
    folder = Path(folder)
    sha = state_dict_sha256(model)
    if sha != card.weights_sha256:
        log.info("backbone %s weights changed since its card was made; recording the new sha256", card.name)
        card = dataclasses.replace(card, weights_sha256=sha)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(unshared(model.state_dict()), str(tmp), metadata={"sha256": sha, "name": card.name})
    write_json(folder / CARD_FILE, card.to_dict())
    return card


def load_backbone(folder: str | Path) -> tuple[nn.Module, BackboneCard]:
    """Rebuild the backbone saved by :func:`save_backbone` and check its sha256 against the card.

    Raises:
        WeightsError: files missing, or weights that are not the ones the card describes.
    """
    folder = Path(folder)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise WeightsError(f"{p} is missing; a backbone folder holds {CARD_FILE} and {WEIGHTS_FILE}")
    card = BackboneCard.from_dict(json.loads(card_path.read_text()))
    model = rebuild_backbone(card)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except (RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"{weights_path} does not fit backbone {card.name!r}: {exc}") from exc
    sha = state_dict_sha256(model)
    if sha != card.weights_sha256:
        raise WeightsError(f"{weights_path} has sha256 {sha[:12]}... but {card_path.name} says "
                           f"{card.weights_sha256[:12]}...: the weights were changed or mixed up; "
                           "re-save the backbone or extract features again")
    return model.eval(), card


# --- JSON-safe timm kwargs -----------------------------------------------------------------------

def encode_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Replace classes/factories (``nn.SiLU``, ``SwiGLUPacked``) by ``"py:<dotted.path>"`` strings."""
    return {key: _encode_value(value, key) for key, value in kwargs.items()}


def decode_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_kwargs`: resolve ``"py:"`` strings (only under timm. or torch.nn.)."""
    return {key: _decode_value(value) for key, value in kwargs.items()}


def _encode_value(value: Any, key: str) -> Any:
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, key) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode_value(v, key) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        for module_name in _ALIAS_MODULES:
            for attr, obj in vars(importlib.import_module(module_name)).items():
                if obj is value:
                    return f"{CALLABLE_MARK}{module_name}.{attr}"
        path = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
        if path.startswith(_RESOLVABLE_PREFIXES) and _resolve(path) is value:
            return CALLABLE_MARK + path
    raise ConfigError(f"timm argument {key}={value!r} cannot be recorded in a backbone card; use plain "
                      f"values, or classes importable from {' or '.join(_RESOLVABLE_PREFIXES)}")


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode_value(v) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(CALLABLE_MARK):
        return _resolve(value[len(CALLABLE_MARK):])
    return value


def _resolve(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not path.startswith(_RESOLVABLE_PREFIXES):
        raise ConfigError(f"backbone card names {path!r}; only {_RESOLVABLE_PREFIXES} are allowed")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"backbone card names {path!r}, which this timm/torch does not have") from exc


def _json_copy(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backbone card timm_kwargs are not JSON-safe: {exc}") from exc
