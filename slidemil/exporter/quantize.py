"""`slidemil quantize`: an int8 backbone for OpenVINO on the CPU, calibrated on the user's slides.

Post-training quantization (NNCF, OpenVINO's quantizer) turns ``backbone.onnx`` into an OpenVINO IR
(``backbone_int8.xml`` + ``.bin``) whose convolutions run in int8: on CPUs with AVX-512 VNNI or AMX
that is about twice bf16. Activation ranges are calibrated on tiles cut from representative slides
with the package's own tiling; fidelity is then measured, not assumed: on other tiles of the same
slides, the int8 backbone plus the head must stay within ``tolerance_for("int8")`` of ONNX Runtime
fp32 in probability, with the same predicted classes, or nothing is written.

The IR is added to the package and recorded in the manifest's ``openvino`` section (files,
calibration, parity), and the manifest is rewritten last with the new checksums.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import BackendUnavailableError, ConfigError, ExportError, SlidemilError
from slidemil.exporter.package import Package, load_package, write_manifest
from slidemil.exporter.verify import ParityConfig, RunnerPair, measure_parity, summary, tolerance_for

log = logging.getLogger(__name__)

INT8_XML = "backbone_int8.xml"
INT8_BIN = "backbone_int8.bin"


@dataclass(frozen=True)
class QuantizeConfig:
    """Calibration settings: tiles for the activation ranges, other tiles for the parity check."""

    calibration_tiles: int = 300
    parity_tiles: int = 128
    seed: int = 0
    batch_size: int = 16
    parity: ParityConfig = ParityConfig(n_tiles=128, batch_sizes=(1, 7, 16))

    def __post_init__(self) -> None:
        if self.calibration_tiles < 16 or self.parity_tiles < 8:
            raise ConfigError("quantize needs at least 16 calibration tiles and 8 parity tiles")


def import_nncf() -> Any:
    """NNCF, or BackendUnavailableError saying how to install it."""
    try:
        import nncf
    except ImportError as exc:
        raise BackendUnavailableError("int8 quantization needs NNCF and OpenVINO: pip install 'slidemil[quantize]'") from exc
    return nncf


def sample_tiles(pkg: Package, slides: str | Path, n: int, seed: int,
                 slide_mpp: float | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` tiles spread over the slides of a folder, glob or CSV, cut with the package's tiling."""
    from slidemil.slide.reader import open_slide
    from slidemil.slide.table import load_slides
    from slidemil.slide.tiling import plan_tiles

    entries = load_slides(slides, slide_mpp)
    rng = np.random.default_rng(seed)
    per_slide = max(1, -(-n // len(entries)))
    tiles, used = [], []
    for entry in entries:
        try:
            with open_slide(entry.path, mpp=entry.mpp) as reader:
                grid = plan_tiles(reader, pkg.tiling).grid
                if len(grid) == 0:
                    continue
                pick = np.sort(rng.choice(len(grid), size=min(per_slide, len(grid)), replace=False))
                tiles.append(reader.read_tiles(grid.coords[pick], grid.patch_size_level0, pkg.tile_px))
                used.append(entry.slide_id)
        except SlidemilError as exc:  # a bad slide among many: calibrate on the others
            log.warning("%s: left out of calibration: %s", entry.slide_id, exc)
    if not tiles:
        raise ConfigError(f"no tissue tiles in {slides} to calibrate on; give slides like those you will score")
    out = np.concatenate(tiles)
    return out[rng.permutation(len(out))[:n]], used


def quantize_backbone(pkg: Package, tiles: np.ndarray, batch_size: int, out_xml: Path) -> list[str]:
    """NNCF post-training quantization of the package's ``backbone.onnx``, saved as an IR at ``out_xml``.

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
    # the .bin is written beside the .xml under the same stem: both go under temporary names first
    with atomic_path(out_xml) as tmp_xml:
        tmp_bin = tmp_xml.with_suffix(".bin")
        try:
            ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
            tmp_bin.replace(out_xml.with_suffix(".bin"))
        finally:
            tmp_bin.unlink(missing_ok=True)
    return kept


def int8_parity(pkg: Package, xml: Path, tiles: np.ndarray, cfg: ParityConfig) -> dict[str, Any]:
    """The int8 backbone + head on OpenVINO against ONNX Runtime fp32."""
    from slidemil.engine.openvino_runner import OpenVinoRunner
    from slidemil.engine.runners import OnnxRuntimeRunner

    ref = RunnerPair(OnnxRuntimeRunner(pkg.backbone_onnx), OnnxRuntimeRunner(pkg.head_onnx))
    cand = RunnerPair(OpenVinoRunner(xml, precision="int8", use_cache=False), OnnxRuntimeRunner(pkg.head_onnx))
    try:
        return measure_parity(ref, cand, tiles, cfg, tolerance_for("int8"))
    finally:
        ref.close()
        cand.close()


def quantize_package(package_dir: str | Path, slides: str | Path, cfg: QuantizeConfig = QuantizeConfig(),
                     slide_mpp: float | None = None) -> Package:
    """Add an int8 OpenVINO backbone, calibrated on ``slides``, to a package; returns the reloaded package.

    Raises:
        BackendUnavailableError: NNCF or OpenVINO missing.
        ExportError: the int8 backbone misses its parity tolerance (nothing is written).
    """
    import_nncf()
    pkg = load_package(package_dir)
    started = time.perf_counter()
    tiles, used = sample_tiles(pkg, slides, cfg.calibration_tiles + cfg.parity_tiles, cfg.seed, slide_mpp)
    if len(tiles) < cfg.calibration_tiles + cfg.parity_tiles:
        log.warning("only %d tissue tiles in %s: calibrating on %d", len(tiles), slides, len(tiles) - cfg.parity_tiles)
    split = max(len(tiles) - cfg.parity_tiles, len(tiles) // 2)
    calibration, held_out = tiles[:split], tiles[split:]
    xml = pkg.root / INT8_XML
    kept = quantize_backbone(pkg, calibration, cfg.batch_size, xml)
    figures = int8_parity(pkg, xml, held_out, dataclasses.replace(cfg.parity, n_tiles=len(held_out)))
    log.info("parity openvino int8 vs onnxruntime fp32: %s", summary(figures))
    if not figures["passed"]:
        xml.unlink()
        xml.with_suffix(".bin").unlink()
        raise ExportError(f"the int8 backbone misses its tolerance ({summary(figures)}); calibrate on more, or more "
                          "representative, slides, or score with --precision bf16")
    section = {"int8": {"backbone": INT8_XML, "weights": INT8_BIN, "reference": "onnxruntime fp32 (cpu)",
                        "calibration": {"slides": used, "tiles": len(calibration), "seed": cfg.seed,
                                        "preset": "mixed", "kept_in_float": kept},
                        "parity_tiles": f"{len(held_out)} other tiles of the same slides", "parity": figures,
                        "seconds": round(time.perf_counter() - started, 1)}}
    versions = {**pkg.manifest.library_versions, **_versions("nncf", "openvino")}
    write_manifest(pkg.root, dataclasses.replace(pkg.manifest, openvino=section, library_versions=versions))
    return load_package(pkg.root)


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
