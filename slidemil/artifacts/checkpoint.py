"""Training checkpoints: safetensors weights + a JSON record, and resumable state without pickle.

A checkpoint ``NAME`` is

- ``NAME.safetensors``: model weights; keys ``head.*`` (the MIL head's state dict, with its
  temperature buffer) and, for end-to-end checkpoints, ``backbone.*``;
- ``NAME.json``: ``{"schema": 1, "mode", "epoch", "metrics", "class_names", "head_config",
  "backbone_card", "backbone_weights": "inside" | "backbone/" | "refetch", "tiling",
  "train_config", "slidemil_version", "files": {file name: sha256}}``, and after ``--calibrate``
  ``"temperature"`` (also in the head's buffer) and ``"calibration"`` (validation ECE/NLL before
  and after). An end-to-end checkpoint's ``backbone_card`` names the sha256 of its ``backbone.*``
  weights (``weights_source`` ``fine-tuned:<source>`` once training changed them);
- optionally ``NAME.state.safetensors`` + ``NAME.state.json``: optimizer, scheduler, scaler and
  RNG state for ``--resume``; tensors in the safetensors file, the nested structure (and python
  and numpy RNG state) in the JSON.

Every file is written atomically and ``NAME.json`` last: it names the sha256 of the weights, and
the state JSON names the sha256 of both its tensors and the weights it belongs to, so a
half-written, mixed or altered checkpoint is a :class:`CheckpointError`, never a silent load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slidemil import __version__, config
from slidemil.atomic import atomic_path, write_json
from slidemil.errors import CheckpointError, ConfigError, WeightsError
from slidemil.models.backbones import (
    CARD_FILE,
    WEIGHTS_FILE,
    BackboneCard,
    create_backbone,
    load_backbone,
    rebuild_backbone,
    state_dict_sha256,
    unshared,
)
from slidemil.models.mil import HeadConfig, MILHead, create_head
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)

SCHEMA = 1
MODES = ("features", "end2end")
BACKBONE_WEIGHTS = ("inside", "backbone/", "refetch")
REQUIRED_META = ("mode", "epoch", "metrics", "class_names", "head_config", "backbone_card", "backbone_weights",
                 "tiling", "train_config")
_SUFFIXES = (".state.safetensors", ".state.json", ".safetensors", ".json")


@contextlib.contextmanager
def deferred_termination() -> Iterator[None]:
    """Hold SIGTERM (SLURM preemption, ``scancel``) until the block ends, so that a checkpoint's
    files are written as a unit; the signal then takes effect as it would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if received:
            log.warning("SIGTERM received while writing a checkpoint; stopping now that it is complete")
            signal.raise_signal(signal.SIGTERM)


def checkpoint_base(path: str | Path) -> Path:
    """``X`` for ``X``, ``X.safetensors``, ``X.json`` or ``X.state.*``."""
    p = Path(path)
    for suffix in _SUFFIXES:
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    state: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint ``path`` (without suffix): weights, optional resume state, then the JSON.

    Args:
        path: checkpoint name, e.g. ``OUT/checkpoint_best`` (a suffix is ignored).
        model_state: weights with ``head.`` (and ``backbone.``) key prefixes.
        meta: the JSON fields of the module docstring except schema, version and files.
        state: nested dicts/lists/tuples of tensors, numbers, strings and numpy arrays.

    Returns:
        The base path.
    """
    base = checkpoint_base(path)
    missing = [k for k in REQUIRED_META if k not in meta]
    bad_keys = [k for k in model_state if not k.startswith(("head.", "backbone."))]
    if missing or bad_keys or meta["mode"] not in MODES:
        raise ValueError(f"checkpoint meta lacks {missing} or has mode {meta.get('mode')!r}, or weights keys "
                         f"lack the head./backbone. prefix: {bad_keys[:5]}")
    if meta["backbone_weights"] not in (*BACKBONE_WEIGHTS, None):
        raise ValueError(f"backbone_weights must be one of {BACKBONE_WEIGHTS}, got {meta['backbone_weights']!r}")
    weights = base.with_name(base.name + ".safetensors")
    with atomic_path(weights) as tmp:
        save_file(unshared(model_state), str(tmp), metadata={"schema": str(SCHEMA), "epoch": str(meta["epoch"])})
    files = {weights.name: file_sha256(weights)}
    if state is not None:
        structure, tensors = flatten_state(state)
        tensors_path = base.with_name(base.name + ".state.safetensors")
        with atomic_path(tensors_path) as tmp:
            save_file(unshared(tensors), str(tmp))
        write_json(base.with_name(base.name + ".state.json"),
                   {"schema": SCHEMA, "epoch": meta["epoch"], "weights_sha256": files[weights.name],
                    "tensors_sha256": file_sha256(tensors_path), "state": structure})
    write_json(base.with_name(base.name + ".json"),
               {"schema": SCHEMA, **meta, "slidemil_version": __version__, "files": files})
    return base


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON record of a checkpoint (schema checked).

    Raises:
        CheckpointError: missing or unreadable JSON, unknown schema, missing fields.
    """
    base = checkpoint_base(path)
    json_path = base.with_name(base.name + ".json")
    if not json_path.is_file():
        raise CheckpointError(f"{json_path} is missing: a checkpoint is NAME.safetensors + NAME.json "
                              "(the JSON is written last; without it the checkpoint is incomplete)")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{json_path} is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise CheckpointError(f"{json_path}: checkpoint schema {meta.get('schema') if isinstance(meta, dict) else '?'}"
                              f" is not {SCHEMA}; use the slidemil version that wrote it")
    missing = [k for k in (*REQUIRED_META, "files") if k not in meta]
    if missing:
        raise CheckpointError(f"{json_path} lacks field(s) {missing}")
    return meta


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint's JSON record, read once and checked: every field typed, or a CheckpointError.

    ``backbone_card`` and ``tiling`` are None when the features the head was trained on did not
    record them (features written by another tool); :meth:`require_backbone` and
    :meth:`require_tiling` say what to do where a step needs them. ``raw`` is the JSON as read.
    """

    base: Path
    mode: str
    epoch: int
    class_names: tuple[str, ...]
    head_config: HeadConfig
    backbone_card: BackboneCard | None
    backbone_weights: str | None
    tiling: TilingConfig | None
    raw: dict[str, Any]

    @property
    def json_path(self) -> Path:
        return self.base.with_name(self.base.name + ".json")

    def require_backbone(self) -> BackboneCard:
        """The backbone card, or a CheckpointError saying how to get a checkpoint that has one."""
        if self.backbone_card is None:
            raise CheckpointError(
                f"checkpoint {self.base} records no backbone: its head was trained on features whose folder has "
                "no backbone/backbone_card.json (features not written by `slidemil extract`). A head only works "
                "with the backbone its features came from: extract features with `slidemil extract`, train on "
                "that folder (--features FEAT, or its h5 folder FEAT/features) and export again")
        return self.backbone_card

    def require_tiling(self) -> TilingConfig:
        """The tiling the features came from, or a CheckpointError saying how to record it."""
        if self.tiling is None:
            raise CheckpointError(
                f"checkpoint {self.base} records no tiling: its features folder had no tiling_config.json. "
                "Tile with `slidemil tile` and extract with `slidemil extract --coords TILES`, then train again")
        return self.tiling


def read_checkpoint(path: str | Path) -> CheckpointRecord:
    """The checked, typed record of checkpoint ``path`` (the JSON beside its weights).

    Raises:
        CheckpointError: missing or unreadable JSON, unknown schema, missing fields, or a field that does
            not parse (class names, head config, backbone card, tiling), each naming the fix.
    """
    base = checkpoint_base(path)
    meta = read_checkpoint_meta(base)
    where = base.with_name(base.name + ".json")

    def parsed(name: str, parse: Any) -> Any:
        value = meta[name]
        if value is None:
            return None
        try:
            if not isinstance(value, Mapping):
                raise ConfigError(f"expected a JSON object, found {type(value).__name__}")
            return parse(value)
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: field {name!r} is malformed ({exc}); the record was edited or written "
                                  "by another tool: use another checkpoint or train again") from exc

    head_config = parsed("head_config", HeadConfig.from_dict)
    if head_config is None:
        raise CheckpointError(f"{where}: field 'head_config' is empty; use another checkpoint or train again")
    names = meta["class_names"]
    if not isinstance(names, list) or len(names) != head_config.n_classes:
        raise CheckpointError(f"{where}: class_names {names!r} do not fit the head's {head_config.n_classes} "
                              "outputs; use another checkpoint or train again")
    if meta["mode"] not in MODES or meta["backbone_weights"] not in (*BACKBONE_WEIGHTS, None):
        raise CheckpointError(f"{where}: mode {meta['mode']!r} / backbone_weights {meta['backbone_weights']!r} "
                              f"are not among {MODES} / {BACKBONE_WEIGHTS}; use another checkpoint or train again")
    return CheckpointRecord(
        base=base, mode=str(meta["mode"]), epoch=int(meta["epoch"]), class_names=tuple(str(c) for c in names),
        head_config=head_config, backbone_card=parsed("backbone_card", BackboneCard.from_dict),
        backbone_weights=meta["backbone_weights"],
        tiling=parsed("tiling", lambda d: config.from_dict(TilingConfig, d)), raw=meta)


class Checkpoint:
    """A checkpoint opened once: its checked record, and its weights read on first use (sha256 checked).

    ``head()`` and ``backbone()`` build the models from the one read of each file, so an export reads
    the JSON and the weights once.
    """

    def __init__(self, record: CheckpointRecord) -> None:
        self.record = record
        self._weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read and check the record of checkpoint ``path`` (see :func:`read_checkpoint`)."""
        return cls(read_checkpoint(path))

    @property
    def base(self) -> Path:
        return self.record.base

    def weights(self) -> dict[str, torch.Tensor]:
        """``NAME.safetensors`` (keys ``head.*`` and ``backbone.*``), its sha256 checked against the record."""
        if self._weights is None:
            path = self.base.with_name(self.base.name + ".safetensors")
            _check_file(path, self.record.raw["files"].get(path.name), self.base)
            try:
                self._weights = load_file(str(path), device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} cannot be read ({exc})") from exc
        return self._weights

    def head(self) -> MILHead:
        """The trained MIL head (eval mode)."""
        head = create_head(self.record.head_config)
        state = {k[len("head."):]: v for k, v in self.weights().items() if k.startswith("head.")}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.base}: weights do not fit the recorded head_config ({exc})") from exc
        return head.eval()

    def backbone(self) -> tuple[nn.Module, BackboneCard]:
        """The backbone the head was trained with (eval mode), its sha256 checked against the card.

        ``backbone_weights`` says where the weights are: ``"inside"`` the checkpoint (``backbone.*``), in
        the ``"backbone/"`` folder beside it, or ``"refetch"`` from timm/hf-hub by name.

        Raises:
            CheckpointError: no backbone recorded, or weights that are not the ones the card names.
        """
        base, card, where = self.base, self.record.require_backbone(), self.record.backbone_weights
        try:
            if where == "inside":
                model = rebuild_backbone(card)
                model.load_state_dict({k[len("backbone."):]: v for k, v in self.weights().items()
                                       if k.startswith("backbone.")})
            elif where == "backbone/":
                model, folder_card = load_backbone(base.parent / "backbone")
                if folder_card.weights_sha256 != card.weights_sha256:
                    raise CheckpointError(f"{base.parent / 'backbone'} holds backbone weights "
                                          f"{folder_card.weights_sha256[:12]}... but checkpoint {base.name} was trained "
                                          f"on {card.weights_sha256[:12]}...")
            elif where == "refetch":
                model, _ = create_backbone(card.name, "pretrained", **card.timm_kwargs)
            else:
                raise CheckpointError(f"checkpoint {base}: unknown backbone_weights {where!r}")
        except (WeightsError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {base}: cannot load its backbone ({exc})") from exc
        sha = state_dict_sha256(model)
        if sha != card.weights_sha256:
            raise CheckpointError(f"checkpoint {base}: backbone weights have sha256 {sha[:12]}... but the card says "
                                  f"{card.weights_sha256[:12]}...; the head was trained on other weights")
        return model.eval(), card


def _check_file(path: Path, expected: str | None, base: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; checkpoint {base.name} is incomplete")
    if expected is None or file_sha256(path) != expected:
        raise CheckpointError(f"{path} does not match the sha256 recorded for checkpoint {base.name}: the file "
                              "was changed, or belongs to another save of this checkpoint (a run killed while "
                              "writing); use another checkpoint or train again")


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and JSON record of checkpoint ``path`` (see :class:`Checkpoint`)."""
    ckpt = Checkpoint.open(path)
    return ckpt.weights(), ckpt.record.raw


def load_head(path: str | Path) -> tuple[MILHead, dict[str, Any]]:
    """The trained head of checkpoint ``path`` (eval mode) and its JSON record."""
    ckpt = Checkpoint.open(path)
    return ckpt.head(), ckpt.record.raw


def load_checkpoint_backbone(path: str | Path) -> tuple[nn.Module, BackboneCard]:
    """The backbone checkpoint ``path``'s head was trained with (see :meth:`Checkpoint.backbone`)."""
    return Checkpoint.open(path).backbone()


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The resume state saved with a checkpoint (checked to belong to its weights)."""
    base = checkpoint_base(path)
    meta = read_checkpoint_meta(base)
    json_path = base.with_name(base.name + ".state.json")
    tensors_path = base.with_name(base.name + ".state.safetensors")
    if not json_path.is_file():
        raise CheckpointError(f"{json_path} is missing; checkpoint {base.name} cannot be resumed")
    record = json.loads(json_path.read_text())
    if record.get("weights_sha256") != meta["files"].get(base.name + ".safetensors") or record.get("epoch") != meta["epoch"]:
        raise CheckpointError(f"{json_path} belongs to another save of {base.name} (a run killed while writing); "
                              "delete checkpoint_last.* to start again")
    _check_file(tensors_path, record.get("tensors_sha256"), base)
    return unflatten_state(record["state"], load_file(str(tensors_path), device="cpu"))


def copy_backbone(source: Path, dest: Path) -> None:
    """Copy a backbone folder's card (and weights) to ``dest``, the ``backbone/`` beside a checkpoint.

    Hard links where the file system allows (no second copy of large weights); files already there
    and identical are left alone.
    """
    for name in (CARD_FILE, WEIGHTS_FILE):
        src, dst = source / name, dest / name
        if not src.is_file() or (dst.is_file() and dst.stat().st_size == src.stat().st_size
                                 and file_sha256(dst) == file_sha256(src)):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            tmp.unlink()
            try:
                tmp.hardlink_to(src)
            except OSError:
                shutil.copy2(src, tmp)


# --- nested state <-> JSON + tensors -------------------------------------------------------------

def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON-safe data and a flat dict of tensors (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = v.detach().cpu()
            return {"__tensor__": key}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x) for k, x in v.items()}
            return {"__items__": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"cannot store {type(v).__name__} in a checkpoint state without pickle")

    return enc(obj), tensors


def unflatten_state(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(data, list):
        return [unflatten_state(x, tensors) for x in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        return np.asarray(data["__ndarray__"], dtype=data["dtype"])
    if "__tuple__" in data:
        return tuple(unflatten_state(x, tensors) for x in data["__tuple__"])
    if "__items__" in data:
        return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors) for k, v in data["__items__"]}
    return {k: unflatten_state(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
