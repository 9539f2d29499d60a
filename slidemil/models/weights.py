"""Weight files and state dicts: checksums, reading safetensors/.pth files, matching keys.

Nothing here unpickles beyond tensors: ``.pth/.pt/.bin`` files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from slidemil.errors import WeightsError

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc.", "head.", "classifier.")  # classifier heads a features-only model lacks
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_NESTING_KEYS = ("state_dict", "model")  # checkpoints that nest the state dict


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: sorted keys, each name + dtype + shape + raw bytes."""
    return tensors_sha256(model.state_dict())


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`state_dict_sha256` of a state dict given as tensors (e.g. a checkpoint's ``backbone.*`` part)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(state[key].shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)  # a memoryview: no copy of the weights
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth/.pt/.bin`` file, unnested; no arbitrary unpickling."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"weights file {path}: unknown suffix {suffix!r}; use .safetensors or .pth")
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as exc:
        raise WeightsError(f"cannot read weights file {path} ({exc}); it must be a plain state dict "
                           "(torch.save(model.state_dict())) or safetensors") from exc
    while isinstance(state, Mapping) and any(isinstance(state.get(k), Mapping) for k in _NESTING_KEYS):
        state = next(state[k] for k in _NESTING_KEYS if isinstance(state.get(k), Mapping))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def strip_common_prefixes(state: Mapping[str, torch.Tensor],
                          extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Remove ``module.``-style prefixes that every key shares (repeatedly)."""
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES + extra:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], ignore_prefixes: tuple[str, ...],
                     path: Path) -> dict[str, torch.Tensor]:
    """The subset of ``state`` that ``model`` expects, or WeightsError naming what does not fit."""
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    dropped = [k for k in unexpected if k.startswith(HEAD_PREFIXES + ignore_prefixes)]
    if dropped:
        log.info("weights %s: dropping %d key(s) the features-only model lacks (%s ...)",
                 path.name, len(dropped), dropped[0])
    unexpected = sorted(set(unexpected) - set(dropped))
    missing = sorted(k for k in expected if k not in state)
    misshapen = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape for", misshapen))
        problems = "; ".join(f"{label} {len(keys)} key(s) {keys[:5]}" for label, keys in groups if keys)
        raise WeightsError(f"weights file {path} does not fit {type(model).__name__}: {problems}. Pass the "
                           "backbone name (and overrides such as depth=...) that the file was saved from, "
                           "or convert the file to that architecture's state dict")
    return {k: state[k] for k in expected}


def unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with storage shared between keys cloned (safetensors refuses it)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


