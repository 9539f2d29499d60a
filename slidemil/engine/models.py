"""Model packages opened for scoring: a backbone runner and a head runner per package.

The engine reads nothing but the package (``artifacts.package.load_package``). ``open_models`` plans
each package's execution (``runtime.plan``: the one place where backend, device and precision are
chosen), activates its runners, and checks that an ensemble's members agree on class names and
tiling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.artifacts.package import Package, load_package
from slidemil.choices import Backend, CompileMode, DecodeMode, Precision
from slidemil.errors import ConfigError, PackageError
from slidemil.runtime.plan import ExecutionPlan, ModelFiles, build_runners, plan_execution
from slidemil.runtime.runners import Runner

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One package ready to run: its plan, its active runners and what it says about itself."""

    name: str
    package: Package
    plan: ExecutionPlan
    backbone: Runner
    head: Runner

    @property
    def backend(self) -> str:
        return self.plan.backend


@contextlib.contextmanager
def open_models(model_dirs: Sequence[str | Path], backend: Backend = "auto", device: str = "auto",
                precision: Precision = "auto", threads: int | None = None,
                torch_compile: CompileMode = "auto", batch_size: int | None = None,
                decode: DecodeMode = "auto") -> Iterator[list[LoadedModel]]:
    """Load each package (checksums verified), plan and activate its runners; deactivate them all on exit.
    ``batch_size`` None and ``decode`` auto leave the batch and where tiles are decoded to the planner."""
    if not model_dirs:
        raise ConfigError("give at least one model package (MODEL_DIR or --model)")
    with contextlib.ExitStack() as stack:
        models = []
        for model_dir in model_dirs:
            package = load_package(model_dir)
            files = ModelFiles.from_package(package)
            plan = plan_execution(files, backend, device, precision, threads, torch_compile, batch_size, decode)
            pair = stack.enter_context(build_runners(files, plan))
            log.info("model %s: %s", Path(model_dir).name, plan.describe())
            models.append(LoadedModel(Path(model_dir).name, package, plan, pair.backbone, pair.head))
        check_ensemble(models)
        yield models


def warm_up(models: Sequence[LoadedModel], batch_size: int) -> None:
    """Run each backbone once on a blank batch of full size: compilation, allocation and autotuning
    happen here, counted as model loading, and not on the first slide."""
    for m in models:
        px = m.package.tiling.tile.patch_size
        blank = np.zeros((batch_size, px, px, 3), np.uint8)
        m.backbone.input_metadata()["tiles"].check("tiles", blank)  # uint8 NHWC tiles of the package's size
        m.backbone.infer({"tiles": blank})


def operating_point(models: Sequence[LoadedModel]) -> dict[str, Any] | None:
    """The operating point the predicted class follows (the manifest's ``operating_point``; None: argmax).

    An ensemble applies one when every member has one for the same class, at the mean of the members'
    thresholds (on the mean probability); otherwise the most probable class.
    """
    ops = [m.package.manifest.operating_point for m in models]
    if not ops or any(op is None for op in ops):
        if len(models) > 1 and any(op is not None for op in ops):
            log.warning("ensemble: not every member has an operating point; predicting the most probable class")
        return None
    first = ops[0]
    assert first is not None
    if any(op["class_index"] != first["class_index"] for op in ops if op is not None):
        log.warning("ensemble: members' operating points are for different classes; predicting the most probable class")
        return None
    if len(ops) == 1:
        return dict(first)
    threshold = float(np.mean([op["threshold"] for op in ops if op is not None]))
    return {**first, "threshold": threshold, "chosen_on": f"mean of the {len(ops)} members' thresholds"}


def check_ensemble(models: list[LoadedModel]) -> None:
    """Members of an ensemble share class names, tile size and mpp (they score the same tiles)."""
    first = models[0].package
    for m in models[1:]:
        p = m.package
        if list(p.class_names) != list(first.class_names):
            raise PackageError(f"ensemble members disagree on class names: {first.class_names} vs {p.class_names}")
        if (p.tiling.tile.patch_size, p.tiling.tile.mpp) != (first.tiling.tile.patch_size, first.tiling.tile.mpp):
            raise PackageError("ensemble members must share tile size and mpp: "
                               f"{first.tiling.tile} vs {p.tiling.tile}")
