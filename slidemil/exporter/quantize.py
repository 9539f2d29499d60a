"""`slidemil quantize`: an int8 backbone for OpenVINO on the CPU, calibrated on the user's slides.

Post-training quantization (NNCF, OpenVINO's quantizer) turns ``backbone.onnx`` into an OpenVINO IR
(``backbone_int8.xml`` + ``.bin``) whose convolutions run in int8: on CPUs with AVX-512 VNNI or AMX
that is about twice bf16.

The slides given are split, with a seed, into calibration slides and held-out slides (about a
quarter, at least one, at most ``parity_slides``; at least two slides are needed). Activation ranges
are calibrated on tiles of the calibration slides, cut with the package's tiling (tissue by colour
where the package's came from user masks, as ``verify`` does). Fidelity is then measured as users
see it, on whole slides: each held-out slide's bag of all its tissue tiles (a seeded uniform sample
of ``parity_max_tiles`` on larger slides) through the int8 backbone and the fp32 head (ONNX Runtime,
as the engine scores) against ONNX Runtime fp32. The gate: max |d probability| over those bags
<= ``tolerance_for("int8")`` and the same predicted class on every held-out slide. Tile-level figures
(feature differences, one-tile bags, random sub-bags) are recorded beside it as information: with a
confident head a one-tile bag at the decision boundary turns feature errors that no slide score
shows into large probability changes.

The IR is written under temporary names and takes its final names only once the gate passes; the
manifest's ``openvino`` section (files, calibration, per-slide parity, the quantizer's library
versions) is rewritten last with the new checksums. A failed run leaves the package as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.artifacts.package import Package, library_versions, load_package, write_manifest
from slidemil.atomic import TMP_MARK
from slidemil.errors import BackendUnavailableError, ConfigError, ExportError, SlidemilError
from slidemil.exporter.parity import (
    ParityConfig,
    colour_tiling,
    compare_bags,
    difference,
    run_backbone,
    tolerance_for,
    whole_bag_figures,
)
from slidemil.runtime.plan import ExecutionPlan, ModelFiles, RunnerPair, build_runners
from slidemil.slide.table import SlideEntry

log = logging.getLogger(__name__)

INT8_XML = "backbone_int8.xml"
INT8_BIN = "backbone_int8.bin"
QUANTIZER_LIBRARIES = ("nncf", "openvino")
READ_CHUNK = 256  # tiles read and run at a time on a held-out slide


@dataclass(frozen=True)
class QuantizeConfig:
    """Calibration and parity settings.

    Attributes:
        calibration_tiles: tiles of the calibration slides for the activation ranges.
        parity_slides: most slides held out of calibration for the gate (about a quarter, at least 1).
        parity_max_tiles: a held-out slide with more tissue tiles is checked on a seeded uniform
            sample of this many (its bag); below it, on all of them.
        seed: the split, the calibration tiles, the samples and the sub-bags follow from it.
        batch_size: backbone batch in calibration and parity.
        parity: ``batch_sizes`` checked (smaller than ``batch_size``) and ``n_slide_bags`` random
            sub-bags per held-out slide, reported as information.
    """

    calibration_tiles: int = 300
    parity_slides: int = 4
    parity_max_tiles: int = 2000
    seed: int = 0
    batch_size: int = 16
    parity: ParityConfig = ParityConfig(n_tiles=128, batch_sizes=(1, 7, 16))

    def __post_init__(self) -> None:
        if self.calibration_tiles < 16:
            raise ConfigError("quantize needs at least 16 calibration tiles")
        if self.parity_slides < 1 or self.parity_max_tiles < 1:
            raise ConfigError("quantize needs at least 1 held-out parity slide of at least 1 tile")


@dataclass(frozen=True)
class PlannedSlide:
    """A slide with its tissue tiles (the package's tiling), ready to be read."""

    entry: SlideEntry
    coords: np.ndarray  # (N, 2) level-0 top-left corners
    size_level0: int

    @property
    def slide_id(self) -> str:
        return self.entry.slide_id


def import_nncf() -> Any:
    """NNCF, or BackendUnavailableError saying how to install it."""
    try:
        import nncf
    except ImportError as exc:
        raise BackendUnavailableError("int8 quantization needs NNCF and OpenVINO: pip install 'slidemil[quantize]'") from exc
    return nncf


# --- slides ------------------------------------------------------------------------------------------

def plan_slides(pkg: Package, slides: str | Path, slide_mpp: float | None = None) -> list[PlannedSlide]:
    """The slides of a folder, glob or CSV with their tissue tiles, tiled as ``verify`` tiles
    (``colour_tiling`` of the package's tiling); unreadable slides and slides without tissue are left out."""
    from slidemil.slide.readers import open_slide
    from slidemil.slide.table import load_slides
    from slidemil.slide.tiling import plan_tiles

    tiling = colour_tiling(pkg.tiling)
    planned = []
    for entry in load_slides(slides, slide_mpp):
        try:
            with open_slide(entry.path, mpp=entry.mpp, slide_id=entry.slide_id) as reader:
                grid = plan_tiles(reader, tiling).grid
        except SlidemilError as exc:  # a bad slide among many: quantize with the others
            log.warning("%s: left out of quantization: %s", entry.slide_id, exc)
            continue
        if len(grid) == 0:
            log.warning("%s: no tissue tiles: left out of quantization", entry.slide_id)
            continue
        planned.append(PlannedSlide(entry, np.asarray(grid.coords), int(grid.patch_size_level0)))
    return planned


def split_slides(planned: list[PlannedSlide], cfg: QuantizeConfig) -> tuple[list[PlannedSlide], list[PlannedSlide]]:
    """(calibration, held out): a seeded quarter of the slides held out (at least 1, at most
    ``cfg.parity_slides``), the rest for calibration; both keep the given order.

    Raises:
        ConfigError: fewer than 2 slides with tissue (one to calibrate on, one to check on).
    """
    if len(planned) < 2:
        raise ConfigError(f"quantize needs at least 2 slides with tissue (found {len(planned)}): tiles of some "
                          "calibrate the int8 backbone, whole other slides check it; give more slides like those "
                          "you will score")
    n_held = min(cfg.parity_slides, max(1, len(planned) // 4))
    held = set(np.random.default_rng(cfg.seed).permutation(len(planned))[:n_held].tolist())
    return ([s for i, s in enumerate(planned) if i not in held], [s for i, s in enumerate(planned) if i in held])


def calibration_tiles(pkg: Package, slides: list[PlannedSlide], n: int, seed: int) -> np.ndarray:
    """``n`` tiles spread evenly over ``slides`` (fewer where the slides have fewer), in a seeded order."""
    from slidemil.slide.readers import open_slide

    rng = np.random.default_rng(seed)
    per_slide = max(1, -(-n // len(slides)))
    tiles = []
    for slide in slides:
        pick = np.sort(rng.choice(len(slide.coords), size=min(per_slide, len(slide.coords)), replace=False))
        with open_slide(slide.entry.path, mpp=slide.entry.mpp, slide_id=slide.slide_id) as reader:
            tiles.append(reader.read_tiles(slide.coords[pick], slide.size_level0, pkg.tile_px))
    out = np.concatenate(tiles)
    return out[rng.permutation(len(out))[:n]]


# --- quantization ------------------------------------------------------------------------------------

def quantize_backbone(pkg: Package, tiles: np.ndarray, batch_size: int, out_xml: Path) -> list[str]:
    """NNCF post-training quantization of the package's ``backbone.onnx``, saved as an IR at ``out_xml``
    (and its weights at ``out_xml`` with suffix ``.bin``).

    The first convolution stays in floating point: it sees raw pixels through three channels, where
    int8 costs the most accuracy and saves the least time (on a test model it cut |d probability| 7x).

    Returns:
        Names of the layers kept in floating point.
    """
    nncf = import_nncf()
    import openvino as ov

    model = ov.Core().read_model(str(pkg.backbone_onnx))
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    kept = convolutions[:1]
    batches = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    dataset = nncf.Dataset(batches, lambda batch: {"tiles": batch})
    quantized = nncf.quantize(model, dataset, subset_size=len(batches), preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(names=kept) if kept else None)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return kept


# --- parity on whole held-out slides ---------------------------------------------------------------

def slide_tiles(slide: PlannedSlide, max_tiles: int, seed: int) -> np.ndarray:
    """Indices of the tiles in a held-out slide's bag: all of them, or a seeded uniform sample of ``max_tiles``."""
    n = len(slide.coords)
    if n <= max_tiles:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=max_tiles, replace=False))


def slide_parity(pkg: Package, ref: RunnerPair, cand: RunnerPair, slide: PlannedSlide, cfg: QuantizeConfig,
                 tolerance: float) -> dict[str, Any]:
    """One held-out slide: its whole bag through ``cand`` against ``ref`` (the gate's figures), and the
    tile-level figures (features, one-tile bags, random sub-bags) as information."""
    from slidemil.slide.readers import open_slide

    pick = slide_tiles(slide, cfg.parity_max_tiles, cfg.seed)
    ref_feats, cand_feats, per_batch = [], [], []
    with open_slide(slide.entry.path, mpp=slide.entry.mpp, slide_id=slide.slide_id) as reader:
        for start in range(0, len(pick), READ_CHUNK):
            tiles = reader.read_tiles(slide.coords[pick[start:start + READ_CHUNK]], slide.size_level0, pkg.tile_px)
            ref_feats.append(run_backbone(ref.backbone, tiles, cfg.batch_size))
            cand_feats.append(run_backbone(cand.backbone, tiles, cfg.batch_size))
            if start == 0:  # the dynamic batch axis of the int8 IR
                per_batch = [difference(ref_feats[0][:b], cand.backbone.infer({"tiles": tiles[:b]})["features"])
                             for b in cfg.parity.batch_sizes if b < min(cfg.batch_size, len(tiles))]
    r, c = np.concatenate(ref_feats), np.concatenate(cand_feats)
    whole = whole_bag_figures(*(pair.head.infer({"features": f}) for pair, f in ((ref, r), (cand, c))))
    names = pkg.class_names
    cosine = (r * c).sum(axis=1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1), 1e-30)
    features = difference(r, c)
    for d in per_batch:
        features = {k: max(features[k], d[k]) for k in features}
    rng = np.random.default_rng([cfg.seed, len(r), 1])
    subsets = [rng.choice(len(r), size=int(rng.integers(1, len(r) + 1)), replace=False)
               for _ in range(cfg.parity.n_slide_bags)]
    information: dict[str, Any] = {
        "features": {**features, "min_cosine": float(cosine.min())},
        "one_tile_bags": _bags(ref, cand, r, c, [np.array([i]) for i in range(len(r))]),
        "sub_bags": _bags(ref, cand, r, c, subsets) if subsets else None}
    return {"slide_id": slide.slide_id, "n_tiles": int(len(pick)), "tissue_tiles": int(len(slide.coords)),
            "probabilities": whole["probabilities"],
            "classes": {"reference": names[whole["reference_class"]], "int8": names[whole["candidate_class"]]},
            "identical_class": whole["identical_class"],
            "passed": bool(whole["probabilities"]["max_abs"] <= tolerance and whole["identical_class"]),
            "information": information}


def _bags(ref: RunnerPair, cand: RunnerPair, r: np.ndarray, c: np.ndarray, bags: list[np.ndarray]) -> dict[str, Any]:
    out = compare_bags([ref.head.infer({"features": r[i]}) for i in bags],
                       [cand.head.infer({"features": c[i]}) for i in bags])
    return {"probabilities": out["probabilities"], "argmax_agreement": out["argmax_agreement"],
            "n_bags": out["n_bags"], "sizes": [int(min(len(i) for i in bags)), int(max(len(i) for i in bags))]}


def int8_parity(pkg: Package, xml: Path, held_out: list[PlannedSlide], cfg: QuantizeConfig) -> dict[str, Any]:
    """The gate: the int8 backbone (OpenVINO) + fp32 head (ONNX Runtime) against ONNX Runtime fp32 on the
    whole bag of each held-out slide; per-slide figures, and the tile-level ones as information."""
    tolerance = tolerance_for("int8")
    files = ModelFiles.from_package(pkg)
    files.int8_backbone = xml  # the candidate IR, still under its temporary name
    # the engine's own runners: ONNX Runtime fp32 against the int8 backbone, the fp32 head on ONNX Runtime
    with build_runners(files, ExecutionPlan("onnxruntime", "cpu", "fp32")) as ref, \
            build_runners(files, ExecutionPlan("openvino", "cpu", "int8")) as cand:
        slides = [slide_parity(pkg, ref, cand, slide, cfg, tolerance) for slide in held_out]
    worst = {k: max(s["probabilities"][k] for s in slides) for k in ("max_abs", "max_rel")}
    info = [s["information"] for s in slides]
    sub_bags = [i["sub_bags"] for i in info if i["sub_bags"]]
    return {
        "gate": "whole-slide bags of the held-out slides: max |d probability| <= tolerance and the same predicted "
                "class on every slide",
        "reference": "onnxruntime fp32 backbone + head (cpu)",
        "candidate": "openvino int8 backbone + onnxruntime fp32 head (cpu), as the engine scores",
        "tolerance": tolerance, "max_tiles_per_slide": cfg.parity_max_tiles, "probabilities": worst,
        "identical_classes": all(s["identical_class"] for s in slides),
        "passed": all(s["passed"] for s in slides), "slides": slides,
        "information": {
            "note": "not gating: tile-level figures of the same held-out tiles (features, every tile as a one-tile "
                    "bag, random sub-bags); a confident head magnifies feature errors in small bags near its "
                    "decision boundary, which no slide score shows",
            "features": {"max_abs": max(i["features"]["max_abs"] for i in info),
                         "max_rel": max(i["features"]["max_rel"] for i in info),
                         "min_cosine": min(i["features"]["min_cosine"] for i in info),
                         "batch_sizes": sorted({*cfg.parity.batch_sizes, cfg.batch_size})},
            "one_tile_bags": _worst_bags([i["one_tile_bags"] for i in info]),
            "sub_bags": _worst_bags(sub_bags) if sub_bags else None}}


def _worst_bags(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(r["n_bags"] for r in records)
    return {"probabilities": {k: max(r["probabilities"][k] for r in records) for k in ("max_abs", "max_rel")},
            "argmax_agreement": sum(r["argmax_agreement"] * r["n_bags"] for r in records) / n, "n_bags": n,
            "sizes": [min(r["sizes"][0] for r in records), max(r["sizes"][1] for r in records)]}


def parity_summary(parity: dict[str, Any]) -> str:
    """The gate per held-out slide, its verdict, and the information, in one line."""
    slides = ", ".join(f"{s['slide_id']} ({s['n_tiles']} tiles) |d prob| {s['probabilities']['max_abs']:.2e} "
                       f"{s['classes']['reference']}/{s['classes']['int8']}" for s in parity["slides"])
    info = parity["information"]
    parts = [f"one-tile bags |d prob| {info['one_tile_bags']['probabilities']['max_abs']:.2e} (argmax agreement "
             f"{info['one_tile_bags']['argmax_agreement']:.4f})"]
    if info.get("sub_bags"):
        sub = info["sub_bags"]
        parts.append(f"{sub['n_bags']} sub-bags of {sub['sizes'][0]}-{sub['sizes'][1]} tiles |d prob| "
                     f"{sub['probabilities']['max_abs']:.2e} (argmax agreement {sub['argmax_agreement']:.4f})")
    parts.append(f"|d feature| {info['features']['max_abs']:.2e} (min cosine {info['features']['min_cosine']:.6f})")
    return (f"gate: whole-slide bags {slides}: max |d prob| {parity['probabilities']['max_abs']:.2e} "
            f"(tolerance {parity['tolerance']:.0e}), classes {'identical' if parity['identical_classes'] else 'DIFFER'}"
            f": {'passed' if parity['passed'] else 'FAILED'}; information, not gating: {'; '.join(parts)}")


# --- slidemil quantize ------------------------------------------------------------------------------------

def quantize_package(package_dir: str | Path, slides: str | Path, cfg: QuantizeConfig = QuantizeConfig(),
                     slide_mpp: float | None = None) -> Package:
    """Add an int8 OpenVINO backbone, calibrated on ``slides``, to a package; returns the reloaded package.

    Raises:
        BackendUnavailableError: NNCF or OpenVINO missing.
        ConfigError: fewer than 2 slides with tissue.
        ExportError: the int8 backbone misses its gate (the package is left as it was).
    """
    import_nncf()
    pkg = load_package(package_dir)
    started = time.perf_counter()
    calibration, held_out = split_slides(plan_slides(pkg, slides, slide_mpp), cfg)
    log.info("int8: calibrating on %d slides, checking on whole held-out slides %s", len(calibration),
             [s.slide_id for s in held_out])
    tiles = calibration_tiles(pkg, calibration, cfg.calibration_tiles, cfg.seed)
    if len(tiles) < cfg.calibration_tiles:
        log.warning("only %d tissue tiles in the %d calibration slides: calibrating on them", len(tiles),
                    len(calibration))
    # Staged under temporary names (which the manifest never lists) until the gate passes: a failed or
    # killed run leaves the package as it was, an earlier int8 backbone included.
    staged = pkg.root / f"{TMP_MARK}{INT8_XML}"
    for leftover in (staged, staged.with_suffix(".bin")):  # of a killed run
        leftover.unlink(missing_ok=True)
    try:
        kept = quantize_backbone(pkg, tiles, cfg.batch_size, staged)
        parity = int8_parity(pkg, staged, held_out, cfg)
        log.info("parity openvino int8 vs onnxruntime fp32: %s", parity_summary(parity))
        if not parity["passed"]:
            raise ExportError(f"the int8 backbone misses its tolerance on whole held-out slides "
                              f"({parity_summary(parity)}); calibrate on more, or more representative, slides, "
                              "or score with --precision bf16")
        staged.with_suffix(".bin").replace(pkg.root / INT8_BIN)
        staged.replace(pkg.root / INT8_XML)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_suffix(".bin").unlink(missing_ok=True)
    current = library_versions()
    quantizer = {k: current[k] for k in QUANTIZER_LIBRARIES if k in current}
    section = {"int8": {"backbone": INT8_XML, "weights": INT8_BIN, "reference": "onnxruntime fp32 (cpu)",
                        "calibration": {"slides": [s.slide_id for s in calibration], "tiles": len(tiles),
                                        "seed": cfg.seed, "preset": "mixed", "kept_in_float": kept},
                        "held_out_slides": [s.slide_id for s in held_out], "parity": parity,
                        "library_versions": quantizer, "seconds": round(time.perf_counter() - started, 1)}}
    # the export's versions stay; the quantizer's, which made the newest files, are added or updated
    versions = {**pkg.manifest.library_versions, **quantizer}
    write_manifest(pkg.root, dataclasses.replace(pkg.manifest, openvino=section, library_versions=versions))
    return load_package(pkg.root)
