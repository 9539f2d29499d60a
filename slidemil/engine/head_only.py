"""The MIL head alone, from a model package or a training checkpoint, for stored features.

A package's head runs as the engine runs it: ``head.onnx`` on ONNX Runtime on the CPU (exact fp32),
so probabilities and attention from stored features equal ``slidemil score``'s on the same
features. A checkpoint's head (``load_head``) runs on torch fp32 on the CPU, as the trainer
evaluates it. Either way the head records what it was trained on (class names, feature width, the
backbone weights' sha256, the tile geometry), so features of another backbone or tiling are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slidemil.artifacts.checkpoint import load_head, read_checkpoint
from slidemil.artifacts.package import MANIFEST_FILE, load_package
from slidemil.errors import ConfigError
from slidemil.models.mil import BagHead
from slidemil.runtime.runners import OnnxRuntimeRunner
from slidemil.slide.grid import TileSpec
from slidemil.slide.tissue import TissueConfig

log = logging.getLogger(__name__)



class HeadRunner(Protocol):
    """What is asked of a head runner: a context manager with ``infer`` and ``describe``."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> str: ...


class TorchHead:
    """A checkpoint's head in torch, fp32 on the CPU: ``infer({"features": (N, D)})`` -> the outputs of
    ``head.onnx`` (``module.output_names``)."""

    def __init__(self, module: BagHead) -> None:
        self.module = module.eval()

    def __enter__(self) -> TorchHead:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = self.module(torch.as_tensor(np.asarray(feed["features"], dtype=np.float32)))
        return {name: t.float().numpy() for name, t in zip(self.module.output_names, outs)}

    def describe(self) -> str:
        return "torch (cpu, fp32)"


@dataclass
class HeadModel:
    """A head ready to score bags of stored features, and what it was trained on.

    Attributes:
        source: the package folder or checkpoint it came from.
        kind: ``package`` or ``checkpoint``.
        class_names: one per output.
        in_dim: the feature width it takes.
        runner: ``infer({"features": (N, D) float32})`` -> logits, probabilities, attention, attention_raw
            (entered as a context manager by ``with head:``).
        weights_sha256: sha256 of the backbone weights its features came from (None when unrecorded).
        tile: the tile geometry it was trained on (None when unrecorded).
        tissue: tissue detection settings (for the thumbnail and tissue mask of a slide file).
        operating_point: the threshold the predicted class follows (None: the most probable class).
    """

    source: Path
    kind: str
    class_names: list[str]
    in_dim: int
    runner: HeadRunner
    weights_sha256: str | None
    tile: TileSpec | None
    tissue: TissueConfig
    operating_point: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"head of {self.kind} {self.source.name} on {self.runner.describe()}"

    def __enter__(self) -> HeadModel:
        self.runner.__enter__()  # loads the model (ONNX Runtime session)
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.__exit__(*exc)

    def check_features(self, dim: int, feature_attrs: dict[str, Any], patch_size: int, mpp: float, where: str) -> None:
        """Refuse features this head cannot score meaningfully.

        Raises:
            ConfigError: another width, other backbone weights, or another tile size or resolution.
        """
        if dim != self.in_dim:
            raise ConfigError(f"{where}: features are {dim}-d but the head takes {self.in_dim}-d; they come from "
                              "another backbone: extract them with the backbone of this model")
        sha = feature_attrs.get("weights_sha256")
        if sha and self.weights_sha256 and str(sha) != self.weights_sha256:
            raise ConfigError(f"{where}: features come from backbone weights {str(sha)[:12]}... but the head was "
                              f"trained on {self.weights_sha256[:12]}...; extract them with the model's backbone")
        if self.tile is not None and (patch_size != self.tile.patch_size or abs(mpp - self.tile.mpp) > 1e-6):
            raise ConfigError(f"{where}: tiles of {patch_size} px at {mpp:g} um/px, but the head was trained on "
                              f"{self.tile.patch_size} px at {self.tile.mpp:g} um/px; tile and extract again with "
                              "the model's tiling")


def open_head(model: str | Path, threads: int | None = None) -> HeadModel:
    """The head of a model package (folder with ``manifest.json``) or of a checkpoint (``run/checkpoint_best``).

    Use the result as a context manager (``with open_head(...) as head:``): that loads the runner.

    Raises:
        PackageError: a package that does not load (checksums, schema).
        CheckpointError: a checkpoint that is missing or inconsistent.
    """
    path = Path(model)
    if (path / MANIFEST_FILE).is_file():
        package = load_package(path)
        runner: HeadRunner = OnnxRuntimeRunner(package.head_onnx, device="cpu", threads=threads)
        return HeadModel(source=path, kind="package", class_names=list(package.class_names),
                         in_dim=package.manifest.mil.in_dim, runner=runner,
                         weights_sha256=package.card.weights_sha256, tile=package.tiling.tile,
                         tissue=package.tiling.tissue, operating_point=package.manifest.operating_point)
    if path.is_dir():
        raise ConfigError(f"{path} is neither a model package (no {MANIFEST_FILE}) nor a checkpoint; give the "
                          "folder `slidemil export` wrote, or a checkpoint such as run/checkpoint_best")
    record = read_checkpoint(path)
    head, _ = load_head(path)
    runner = TorchHead(BagHead(head))
    card = record.backbone_card
    return HeadModel(source=path, kind="checkpoint", class_names=list(record.class_names),
                     in_dim=record.head_config.in_dim, runner=runner,
                     weights_sha256=card.weights_sha256 if card is not None else None,
                     tile=record.tiling.tile if record.tiling is not None else None,
                     tissue=record.tiling.tissue if record.tiling is not None else TissueConfig(),
                     operating_point=record.raw.get("operating_point"))
