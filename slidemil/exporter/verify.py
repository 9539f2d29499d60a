"""``slidemil verify``: a model package checked (schema, checksums, a smoke run of every file) and the
parity of one backend measured as scoring runs it (:mod:`slidemil.exporter.parity`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.artifacts.package import Package, load_package
from slidemil.errors import BackendUnavailableError
from slidemil.exporter.parity import (
    ParityConfig,
    fit_profiles,
    gate_summary,
    information_summary,
    measure_parity,
    parity_gate,
    parity_tiles,
    tolerance_for,
)
from slidemil.models.mil import PER_CLASS_OUTPUT
from slidemil.runtime.plan import (
    ExecutionPlan,
    ModelFiles,
    RunnerPair,
    build_runners,
    plan_execution,
    runner_for,
)

log = logging.getLogger(__name__)


# --- slidemil verify ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One check of ``verify``: status ``ok``, ``failed`` or ``skipped``, with what was seen."""

    name: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """What ``verify_package`` found; ``ok`` is False when a check or the parity failed."""

    root: Path
    backend: str
    precision: str
    checks: list[Check] = field(default_factory=list)
    parity: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.checks) and (self.parity is None or self.parity["passed"])

    def lines(self) -> list[str]:
        """One line per check; the parity's gate on one line, and with a whole-bag gate, its information
        (figures that do not decide pass or fail) on another, marked ``info``."""
        out = [f"{c.status:>7}  {c.name}: {c.detail}" for c in self.checks]
        if self.parity is not None:
            what = f"parity {self.parity['candidate']} vs {self.parity['reference']}"
            out.append(f"{'ok' if self.parity['passed'] else 'failed':>7}  {what} on {self.parity['tiles']}: "
                       f"{gate_summary(self.parity)}")
            if self.parity.get("gate") == "whole_bag":
                out.append(f"{'info':>7}  {what}: {information_summary(self.parity)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``slidemil verify --json``)."""
        return {"package": str(self.root), "backend": self.backend, "precision": self.precision, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks],
                "parity": self.parity}


def verify_package(root: str | Path, backend: str = "onnxruntime", precision: str = "auto", device: str = "cpu",
                   parity: ParityConfig | None = ParityConfig()) -> VerifyReport:  # noqa: B008 (frozen config)
    """Check a package: schema and checksums, a smoke inference of every graph, engine and torch
    weights present, and the parity of ``backend`` at ``precision``.

    The reference is torch fp32 for ``onnxruntime`` and ONNX Runtime fp32 for the other backends. fp32
    passes when every figure is within 1e-4; bf16, fp16 and int8 when the whole bag of the parity
    tiles is within 1e-2 with the same predicted class (sub-bags and head bags are information).

    Raises:
        PackageError: unknown schema, missing or tampered file.
    """
    pkg = load_package(root)
    report = VerifyReport(pkg.root, backend, precision, [Check(
        "schema and checksums", "ok", f"schema {pkg.manifest.schema_version}, {len(pkg.manifest.files)} files")])
    report.checks.extend(smoke_test(pkg))
    if parity is not None:
        report.parity = backend_parity(pkg, backend, precision, device, parity)
        report.precision = report.parity["precision"]
    return report


def smoke_test(pkg: Package) -> list[Check]:
    """Run every graph, engine and the torch weights of ``pkg`` once on small inputs."""
    files = ModelFiles.from_package(pkg)
    targets = [(f"onnx {p} graphs (onnxruntime cpu)", "onnxruntime", p, "cpu")
               for p in pkg.precisions("backbone") if p in pkg.precisions("head")]
    targets.append(("torch weights", "torch", "fp32", "cpu"))
    targets += [(f"tensorrt {p} engines", "tensorrt", p, "cuda") for p in pkg.precisions("backbone", fmt="tensorrt")]
    if pkg.openvino_int8(missing_ok=True) is not None:
        targets.append(("openvino int8 backbone", "openvino", "int8", "cpu"))
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, pkg.tile_px, pkg.tile_px, 3), dtype=np.uint8)
    features = rng.standard_normal((7, pkg.card.feature_dim)).astype(np.float32)
    checks = []
    for name, backend, precision, device in targets:
        head_backend, head_precision = (backend, precision) if backend != "openvino" else ("onnxruntime", "fp32")
        try:
            pair = RunnerPair(runner_for(files, "backbone", backend, precision, device),
                              runner_for(files, "head", head_backend, head_precision, device))
            with pair:
                problems = _smoke(pair, tiles, features, len(pkg.class_names))
        except BackendUnavailableError as exc:
            checks.append(Check(name, "skipped", str(exc)))
            continue
        except Exception as exc:  # backends raise their own types; the failure is recorded, not hidden
            problems = [f"{type(exc).__name__}: {exc}"]
        checks.append(Check(name, "failed" if problems else "ok", "; ".join(problems) or
                            f"tiles {tiles.shape} -> features, bag of {len(features)} -> {len(pkg.class_names)} classes"))
    return checks


def _smoke(pair: RunnerPair, tiles: np.ndarray, features: np.ndarray, n_classes: int) -> list[str]:
    problems = []
    feats = pair.backbone.infer({"tiles": tiles})["features"]
    if feats.shape != (len(tiles), features.shape[1]) or not np.isfinite(feats).all():
        problems.append(f"backbone gave {feats.shape} (finite: {bool(np.isfinite(feats).all())})")
    out = pair.head.infer({"features": features})
    want: dict[str, tuple[int, ...]] = {"logits": (n_classes,), "probabilities": (n_classes,),
                                        "attention": (len(features),), "attention_raw": (len(features),)}
    if PER_CLASS_OUTPUT in out:  # heads with one attention map per class
        want[PER_CLASS_OUTPUT] = (n_classes, len(features))
    for name, shape in want.items():
        if name not in out or out[name].shape != shape or not np.isfinite(out[name]).all():
            problems.append(f"head output {name}: {getattr(out.get(name), 'shape', 'missing')}, want {shape}")
    for name in ("probabilities", "attention"):
        if name in out and abs(float(out[name].sum()) - 1.0) > 1e-3:
            problems.append(f"head {name} sum to {float(out[name].sum()):.4f}, not 1")
    per_class = out.get(PER_CLASS_OUTPUT)
    if per_class is not None and per_class.shape == want[PER_CLASS_OUTPUT] and np.abs(per_class.sum(1) - 1).max() > 1e-3:
        problems.append(f"head {PER_CLASS_OUTPUT}: a class's map sums to {per_class.sum(1).tolist()}, not 1")
    return problems


def backend_parity(pkg: Package, backend: str, precision: str, device: str, cfg: ParityConfig) -> dict[str, Any]:
    """Parity of ``backend`` as ``score`` would run it (the planner's runners: the backbone on ``backend``,
    the head on ONNX Runtime fp32, or torch for the torch backend) against the reference (torch fp32 for
    onnxruntime, else ONNX Runtime fp32), gated as ``parity_gate(precision)`` says."""
    files = ModelFiles.from_package(pkg)
    plan = plan_execution(files, backend, "cuda" if backend == "tensorrt" else device, precision)  # type: ignore[arg-type]
    ref_plan = (ExecutionPlan("torch", "cpu", "fp32", head="torch") if plan.backend == "onnxruntime"
                else ExecutionPlan("onnxruntime", "cpu", "fp32"))
    cfg = fit_profiles(cfg, pkg.manifest.max_batch, (pkg.manifest.tensorrt or {}) if plan.backend == "tensorrt" else {})
    tiles, source = parity_tiles(pkg.tiling, pkg.tile_px, cfg.n_tiles, cfg.slide, cfg.seed)
    with build_runners(files, ref_plan) as ref, build_runners(files, plan) as cand:
        figures = measure_parity(ref, cand, tiles, cfg, tolerance_for(plan.precision), gate=parity_gate(plan.precision))
    if "whole_bag" in figures:
        whole, names = figures["whole_bag"], pkg.class_names
        whole["classes"] = {"reference": names[whole["reference_class"]], "candidate": names[whole["candidate_class"]]}
    return {"reference": f"{ref_plan.backend} fp32 (cpu)", "candidate": f"{plan.backend} {plan.precision}",
            "plan": plan.describe(), "precision": plan.precision, "tiles": source, **figures}
