"""Probes of `slidemil doctor` about the job: backbone weights and model package.

The package probe loads the package as the engine does (``load_package``: schema, files, sha256),
opens it with the engine's own plan (``open_models`` with backend, device and precision ``auto``),
and runs one small batch through the backbone runner and the head runner it picked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.artifacts.package import Package, library_versions, load_package
from slidemil.doctor.report import Check
from slidemil.engine.models import open_models
from slidemil.errors import ConfigError, SlidemilError
from slidemil.models.backbones import FOUNDATION_MODELS, backbone_spec, list_backbones

Facts = dict[str, Any]
ProbeSpec = tuple[str, str, Callable[[], Iterable[Check] | Check]]

HUB_TIMEOUT_S = 5.0
SMOKE_TILES = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz")
COMPARED_LIBRARIES = ("torch", "onnx", "onnxruntime", "openvino", "timm")


def probes(facts: Facts, model: Path | None, backbone: str | None, online: bool) -> list[ProbeSpec]:
    """The job's probes, for what was given."""
    out: list[ProbeSpec] = []
    if backbone is not None:
        out.append(("weights", f"backbone {backbone}", lambda: backbone_rows(backbone, online)))
    if model is not None:
        out.append(("package", "package", lambda: package_rows(Path(model), facts)))
    return out


# -- backbone weights ------------------------------------------------------------------------------

def hub_offline() -> bool:
    """Whether Hugging Face is switched offline (``HF_HUB_OFFLINE``), read now."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "huggingface" / "hub"


def hub_repo(name: str) -> tuple[str | None, str]:
    """The Hugging Face repository that ``--weights pretrained`` downloads for ``name``, and where that came from.

    Raises:
        ConfigError: ``name`` is not a backbone slidemil knows, a timm name, or ``hf-hub:<repo>``.
    """
    spec = backbone_spec(name)
    wanted = spec.pretrained or spec.arch
    if wanted.startswith(("hf-hub:", "hf_hub:")):
        return wanted.split(":", 1)[1], "hf-hub"
    import timm

    cfg = timm.models.get_pretrained_cfg(wanted)
    if cfg is not None and cfg.hf_hub_id:
        return str(cfg.hf_hub_id), f"timm {wanted}"
    return None, f"timm {wanted} (downloaded from {cfg.url if cfg is not None else 'no known source'})"


def cached_weights(repo: str) -> dict[str, Any] | None:
    """Files and size of ``repo`` in the local hub cache (a scan, no network), or None when absent."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return None
    for cached in info.repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            files = sorted({f.file_name for rev in cached.revisions for f in rev.files})
            weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
            return {"files": files, "weights": weights, "bytes": cached.size_on_disk}
    return None


def backbone_rows(name: str, online: bool) -> list[Check]:
    row = f"backbone {name}"
    try:
        repo, source = hub_repo(name)
    except ConfigError as exc:
        return [Check("weights", row, "fail", f"unknown backbone {name!r}",
                      hint=f"use one of {', '.join(list_backbones())}, a timm model name or hf-hub:<repo> ({exc})")]
    if repo is None:
        return [Check("weights", row, "info", f"pretrained weights come from {source}, not the Hugging Face hub; "
                      "they are fetched on first use")]
    gated = name in FOUNDATION_MODELS
    cached = cached_weights(repo)
    data = {"repo": repo, "source": source, "cache": str(hf_cache_dir()), "gated": gated, "cached": cached}
    rows = []
    if cached and cached["weights"]:
        rows.append(Check("weights", row, "ok", f"{repo} is in the local cache ({', '.join(cached['weights'])}; "
                          f"{cached['bytes'] / 1e6:.0f} MB)", data=data))
    else:
        how = ("accept its terms on huggingface.co and `huggingface-cli login`, then " if gated else "")
        rows.append(Check("weights", row, "warn", f"{repo} ({source}) is not in the local cache {hf_cache_dir()}"
                          + (" (gated repository)" if gated else ""),
                          hint=f"on a machine with network: {how}`huggingface-cli download {repo}` (set HF_HOME to a "
                               "cache this machine reads), or pass the weights file with --weights FILE; ignore this "
                               "with --weights random or FILE", data=data))
    if online:
        rows.append(hub_reachable_row(row, repo, gated))
    return rows


def hub_reachable_row(row: str, repo: str, gated: bool) -> Check:
    """Whether the hub answers for ``repo`` within HUB_TIMEOUT_S (never under HF_HUB_OFFLINE)."""
    name = f"{row} on the hub"
    if hub_offline():
        return Check("weights", name, "info", "not asked: HF_HUB_OFFLINE is set",
                     hint="unset HF_HUB_OFFLINE to let doctor ask the hub")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any network or hub error is what we report
        return Check("weights", name, "warn", f"the hub did not answer for {repo}: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:160] if str(exc) else ''}",
                     hint="check the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT; or copy the cache from a "
                          "machine that has the weights")
    gate = getattr(info, "gated", False)
    detail = f"{repo} is reachable" + (f" (gated: {gate}; downloads need accepted terms and a token)" if gate else "")
    return Check("weights", name, "ok", detail, data={"gated": gate or gated})


# -- model package --------------------------------------------------------------------------------

def package_rows(model: Path, facts: Facts) -> list[Check]:
    """Load, compare versions, open with the engine's plan, run one small batch."""
    try:
        package = load_package(model)
    except SlidemilError as exc:
        return [Check("package", "package", "fail", str(exc),
                      hint="re-export the package (slidemil export) or copy it again from its source")]
    m = package.manifest
    tile = m.tile
    rows = [Check("package", "package", "ok", f"{model}: schema {m.schema_version}, {len(m.files)} files match their "
                  f"sha256; classes {list(m.class_names)}; backbone {m.backbone.name} ({m.backbone.feature_dim}-d); "
                  f"tiles {tile.patch_size} px at {tile.mpp:g} um/px",
                  data={"files": len(m.files), "classes": list(m.class_names), "backbone": m.backbone.name,
                        "created": m.created})]
    rows.append(versions_row(package))
    rows += optional_files_rows(package, facts)
    rows += runner_rows(model, package, facts)
    return rows


def versions_row(package: Package) -> Check:
    made = package.manifest.library_versions
    here = library_versions()
    differ = {k: (made[k], here.get(k, "absent")) for k in COMPARED_LIBRARIES if k in made and made[k] != here.get(k)}
    if not differ:
        return Check("package", "package versions", "ok", "made with the library versions installed here")
    listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())
    return Check("package", "package versions", "info", f"made with other versions: {listed}",
                 hint="usually harmless: `slidemil verify MODEL` measures the parity here",
                 data={"differ": {k: list(v) for k, v in differ.items()}})


def optional_files_rows(package: Package, facts: Facts) -> list[Check]:
    rows = []
    int8 = package.openvino_int8(missing_ok=True)
    rows.append(Check("package", "package int8", "info",
                      "int8 OpenVINO backbone present: OpenVINO on the CPU runs it with --precision auto" if int8
                      else "no int8 backbone (slidemil quantize makes one for OpenVINO on the CPU)"))
    engines = package.precisions("backbone", fmt="tensorrt")
    if engines:
        trt = package.manifest.tensorrt or {}
        built = f"TensorRT engines ({', '.join(engines)}) built on {trt.get('gpu_name')} with TensorRT {trt.get('version')}"
        rows.append(engine_row(package, built) if facts.get("cuda") else
                    Check("package", "package tensorrt", "info", built + "; not used without a GPU"))
    return rows


def engine_row(package: Package, built: str) -> Check:
    from slidemil.runtime.tensorrt_runner import check_engine_compatible

    try:
        check_engine_compatible(package)
    except SlidemilError as exc:
        return Check("package", "package tensorrt", "warn", str(exc),
                     hint=f"slidemil build-engine {package.root} on this GPU")
    return Check("package", "package tensorrt", "ok", built + ": they fit this GPU")


def runner_rows(model: Path, package: Package, facts: Facts) -> list[Check]:
    """Open the package with the engine's own choice (backend, device, precision auto) and run one small batch."""
    start = time.perf_counter()
    try:
        with open_models([model], "auto", "auto", "auto", torch_compile="off") as models:
            loaded = models[0]
            opened = time.perf_counter() - start
            described = loaded.backbone.describe()
            facts["plan"] = described
            runner = Check("package", "package runner", "ok", f"backend {loaded.backend}: backbone on {described}, "
                           f"head on {loaded.head.describe()} (opened in {opened:.1f} s)",
                           data={"backend": loaded.backend, "backbone": described, "head": loaded.head.describe()})
            return [runner, smoke_row(loaded, package)]
    except (SlidemilError, OSError, RuntimeError, ValueError) as exc:
        return [Check("package", "package runner", "fail", f"score cannot open {model} here: {type(exc).__name__}: {exc}",
                      hint="follow the message; `slidemil verify MODEL --backend NAME` checks one backend alone")]


def smoke_row(loaded: Any, package: Package) -> Check:
    """Backbone on SMOKE_TILES seeded noise tiles, then the head on their features: shapes and finite numbers."""
    px = package.tile_px
    tiles = np.random.default_rng(0).integers(0, 256, (SMOKE_TILES, px, px, 3), dtype=np.uint8)
    start = time.perf_counter()
    try:
        features = np.asarray(loaded.backbone.infer({"tiles": tiles})["features"], dtype=np.float32)
        out = loaded.head.infer({"features": features})
    except (SlidemilError, OSError, RuntimeError, ValueError, KeyError) as exc:
        return Check("package", "package smoke", "fail", f"one batch of {SMOKE_TILES} tiles failed: "
                     f"{type(exc).__name__}: {exc}", hint="`slidemil verify MODEL` runs every graph and says which fails")
    seconds = time.perf_counter() - start
    probs = np.asarray(out["probabilities"], dtype=np.float64).reshape(-1)
    want = (SMOKE_TILES, package.card.feature_dim)
    problems = []
    if features.shape != want:
        problems.append(f"features {features.shape}, expected {want}")
    if not (np.isfinite(features).all() and np.isfinite(probs).all()) or abs(probs.sum() - 1) > 1e-3:
        problems.append("non-finite features or probabilities that do not sum to 1")
    detail = (f"{SMOKE_TILES} tiles of {px} px -> features {features.shape} -> probabilities "
              f"{np.round(probs, 4).tolist()} in {seconds * 1000:.0f} ms")
    if problems:
        return Check("package", "package smoke", "fail", detail + ": " + "; ".join(problems),
                     hint="`slidemil verify MODEL` measures parity backend by backend")
    return Check("package", "package smoke", "ok", detail, data={"seconds": round(seconds, 4)})
