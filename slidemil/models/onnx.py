"""ONNX export of the uint8 backbone graph and the one-bag head graph.

``backbone.onnx``: input ``tiles`` uint8 (B, H, W, 3) RGB -> output ``features`` float32 (B, D);
cast, normalisation and the NHWC->NCHW permute are inside the graph. ``head.onnx``: input
``features`` float32 (N, D) -> ``logits`` (C), ``probabilities`` (C), ``attention`` (N),
``attention_raw`` (N), and for heads with one attention map per class ``attention_per_class`` (C, N).
Both graphs have a dynamic tile (batch) axis. The dynamo exporter is tried first; the
TorchScript-based one is the fallback (or the choice, with ``exporter="legacy"``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from slidemil.atomic import atomic_path
from slidemil.errors import ExportError
from slidemil.models.mil import HEAD_OUTPUTS, BagHead

__all__ = ["HEAD_INPUTS", "HEAD_OUTPUTS", "export_backbone", "export_graph", "export_head"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TWO_GB = 2 * 1024**3
BACKBONE_INPUTS, BACKBONE_OUTPUTS = ("tiles",), ("features",)
HEAD_INPUTS = ("features",)
_TILE_AXIS = {"features": 0, "attention": 0, "attention_raw": 0, "attention_per_class": 1}  # legacy exporter


def export_graph(module: nn.Module, example: torch.Tensor, path: str | Path, input_names: tuple[str, ...],
                 output_names: tuple[str, ...], dynamic_axis: str, opset: int = DEFAULT_OPSET,
                 exporter: str = "auto") -> Path:
    """Export ``module`` with a dynamic first input axis named ``dynamic_axis``, atomically.

    Weights go inside the file below 2 GB and into external data beside it above.
    """
    path = Path(path)
    module = module.eval().cpu()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    external = size >= TWO_GB
    tries = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    errors = []
    for kind in tries:
        try:
            with atomic_path(path) as tmp:
                _export(module, example, tmp, input_names, output_names, dynamic_axis, opset, kind, external)
                if external:
                    _move_external_data(tmp, path)
            log.info("exported %s with the %s exporter (opset %d)", path.name, kind, opset)
            return path
        except Exception as exc:  # exporters raise many types; the next exporter gets its chance
            log.warning("%s exporter failed on %s: %s", kind, path.name, str(exc).splitlines()[0] if str(exc) else exc)
            errors.append(f"{kind}: {exc}")
    raise ExportError(f"cannot export {path.name}: " + " | ".join(e[:300] for e in errors))


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_names: tuple[str, ...],
            output_names: tuple[str, ...], axis: str, opset: int, kind: str, external: bool) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            batch = torch.export.Dim(axis, min=1, max=1 << 20)
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        dynamic_shapes=({0: batch},), external_data=external,
                                        optimize=True, verbose=False)
            if program is None:
                raise ExportError("the dynamo exporter returned no program")
            program.save(str(path), external_data=external)
        else:
            axes = {input_names[0]: {0: axis}}
            axes.update({n: {_TILE_AXIS[n]: axis} for n in output_names if n in _TILE_AXIS
                         and axis in ("batch", "n_tiles") and not (n == "features" and axis == "n_tiles")})
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset, dynamic_axes=axes)


def _move_external_data(tmp: Path, final: Path) -> None:
    """Re-save a large model with its external data named after the final file."""
    import onnx
    model = onnx.load(str(tmp))
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=final.name + ".data")


def export_backbone(module: nn.Module, path: str | Path, input_size: int, opset: int = DEFAULT_OPSET,
                    exporter: str = "auto") -> Path:
    """Export a ``UInt8Backbone`` as ``backbone.onnx`` (dynamic batch)."""
    example = torch.randint(0, 256, (2, input_size, input_size, 3), dtype=torch.uint8)
    return export_graph(module, example, path, BACKBONE_INPUTS, BACKBONE_OUTPUTS, "batch", opset, exporter)


def export_head(module: BagHead, path: str | Path, feature_dim: int, opset: int = DEFAULT_OPSET,
                exporter: str = "auto") -> Path:
    """Export a ``BagHead`` as ``head.onnx`` (dynamic number of tiles; its outputs: ``module.output_names``)."""
    example = torch.randn(7, feature_dim)
    return export_graph(module, example, path, HEAD_INPUTS, module.output_names, "n_tiles", opset, exporter)
