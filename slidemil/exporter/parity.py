"""Fidelity of exported models, measured on real tiles: the parity figures export, verify, quantize and
``build-engine`` record.

A candidate (ONNX Runtime, OpenVINO, TensorRT, or torch at reduced precision) is compared with a
reference (torch fp32 at export; ONNX Runtime fp32 for the other backends) on tiles cut from a
synthetic slide with the package's own tiling (random tiles only when the slide synthesiser is not
available), through the backbone at several batch sizes and the head on bags of several sizes:

- ``features``: max abs / relative difference and the lowest cosine similarity per tile;
- ``end_to_end``: bags of the real tiles, each side running its own backbone then its own head;
- ``head``: bags of resampled real features with noise (1, 500, 20,000 tiles), same input to both heads;
- per bag set: |d| of logits, probabilities, attention and, for heads with one map per class,
  ``attention_per_class``;
- ``probabilities`` and ``argmax_agreement`` over all bags, against the tolerance of the precision.

Which figures gate (``measure_parity(gate=...)``):

- ``"all"`` (fp32, export, TensorRT builds): every figure above, 1e-4 at fp32; fp32 must match everywhere.
- ``"whole_bag"`` (``slidemil verify`` at bf16, fp16 and int8): the bag of all the real tiles, which is
  what a slide score is: |d probability| within the tolerance and the same predicted class. The random
  sub-bags (down to one tile) and the noisy head bags are reported as information: with a confident
  head, a one-tile bag at the decision boundary turns feature errors that no slide score shows into
  large probability changes.

"Relative" differences are the max abs difference over the largest reference magnitude.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import ExportError
from slidemil.models.mil import HEAD_OUTPUTS, PER_CLASS_OUTPUT
from slidemil.runtime.plan import RunnerPair
from slidemil.runtime.runners import Runner
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # |d probability| above this fails an export
HALF_TOLERANCE = 1e-2  # fp16 / bf16
FIDELITY_TARGET = 1e-5  # the design's ONNX-vs-torch target, reported beside the figures
MIN_ARGMAX_AGREEMENT = 0.999
SYNTH_MPP = 0.5


@dataclass(frozen=True)
class ParityConfig:
    """How parity is measured.

    Attributes:
        n_tiles: real tiles cut from the slide.
        batch_sizes: backbone batch sizes checked (dynamic batch axis).
        bag_sizes: sizes of the random bags given to both heads (dynamic bag axis).
        n_slide_bags: random subsets of the real tiles scored end to end, besides the whole set.
        seed: tiles, bags and the synthetic slide follow from it.
        slide: a slide file to cut tiles from instead of a synthetic one.
    """

    n_tiles: int = 64
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    bag_sizes: tuple[int, ...] = (1, 500, 20_000)
    n_slide_bags: int = 32
    seed: int = 0
    slide: str | None = None


def tolerance_for(precision: str) -> float:
    return FP32_TOLERANCE if precision == "fp32" else HALF_TOLERANCE


# --- tiles -------------------------------------------------------------------------------------------

def parity_tiles(tiling: TilingConfig, tile_px: int, n: int, slide: str | Path | None = None,
                 seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` uint8 tiles (n, tile_px, tile_px, 3) cut from ``slide`` or a synthetic slide, and their source.

    The slide is tiled with ``tiling`` (tissue detection and grid, as the engine does).
    """
    if slide is not None:
        return _cut_tiles(Path(slide), tiling, tile_px, n, seed), f"slide {Path(slide).name}"
    try:
        from slidemil.slide.synth import slide_rng, write_slide
    except ImportError as exc:
        log.warning("slide synthesiser unavailable (%s): parity on random tiles", exc)
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (n, tile_px, tile_px, 3), dtype=np.uint8), "random tiles"
    size_level0 = tiling.tile.size_level0(SYNTH_MPP)
    side = math.sqrt(4 * n * 4 / 3) * size_level0  # ~4 grid cells per wanted tile: tissue covers ~half
    size = int(min(8192, max(1024, math.ceil(side / 256) * 256)))
    with tempfile.TemporaryDirectory(prefix="slidemil-parity-") as tmp:
        path = Path(tmp) / "parity.svs"
        write_slide(path, size=size, label=1, n_classes=2, lesion_fraction=0.05, rng=slide_rng(seed, 0),
                    mpp=SYNTH_MPP)
        return _cut_tiles(path, tiling, tile_px, n, seed), f"synthetic slide ({size} px, seed {seed})"


def colour_tiling(tiling: TilingConfig) -> TilingConfig:
    """``tiling`` with tissue found by colour where it came from user masks: those masks belong to the
    training slides, not to the slides that parity and calibration tiles are cut from."""
    from dataclasses import replace
    if tiling.tissue.method != "mask":
        return tiling
    return replace(tiling, tissue=replace(tiling.tissue, method="otsu", mask_dir=None))


def _cut_tiles(path: Path, tiling: TilingConfig, tile_px: int, n: int, seed: int) -> np.ndarray:
    from slidemil.slide.readers import open_slide
    from slidemil.slide.tiling import plan_tiles

    tiling = colour_tiling(tiling)
    rng = np.random.default_rng(seed)
    with open_slide(path) as reader:
        grid = plan_tiles(reader, tiling).grid
        if len(grid) == 0:
            raise ExportError(f"{path.name} has no tissue tiles for the parity check; give another slide")
        pick = np.sort(rng.choice(len(grid), size=min(n, len(grid)), replace=False))
        tiles = reader.read_tiles(grid.coords[pick], grid.patch_size_level0, tile_px)
    extra = [np.rot90(tiles[i % len(tiles)], k=1 + (i // len(tiles)) % 3) for i in range(n - len(tiles))]
    return np.ascontiguousarray(np.concatenate([tiles, np.stack(extra)]) if extra else tiles)


# --- comparisons --------------------------------------------------------------------------------------

def difference(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Max abs difference, and the same over the largest reference magnitude."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ExportError(f"shape mismatch in parity check: {ref.shape} vs {out.shape}")
    if not np.isfinite(out).all():
        return {"max_abs": math.inf, "max_rel": math.inf}
    d = float(np.abs(ref - out).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return {"max_abs": d, "max_rel": d / scale if scale > 0 else d}


def _worst(*diffs: dict[str, float]) -> dict[str, float]:
    return {k: max(d[k] for d in diffs) for k in diffs[0]}


def _min_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    num = (ref * out).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30)))


def run_backbone(runner: Runner, tiles: np.ndarray, batch: int) -> np.ndarray:
    """Features (N, D) of ``tiles`` in batches of ``batch``."""
    return np.concatenate([runner.infer({"tiles": tiles[i:i + batch]})["features"]
                           for i in range(0, len(tiles), batch)])


def _score(runner: Runner, bags: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [runner.infer({"features": np.ascontiguousarray(bag, dtype=np.float32)}) for bag in bags]


def compare_bags(ref: list[dict[str, np.ndarray]], out: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Head outputs of the same bags, reference vs candidate."""
    names = [n for n in HEAD_OUTPUTS if n != "attention_raw"]
    if ref and all(PER_CLASS_OUTPUT in r and PER_CLASS_OUTPUT in o for r, o in zip(ref, out)):
        names.append(PER_CLASS_OUTPUT)  # heads with one attention map per class
    figures: dict[str, Any] = {name: _worst(*(difference(r[name], o[name]) for r, o in zip(ref, out)))
                               for name in names}
    agree = [int(np.argmax(r["probabilities"]) == np.argmax(o["probabilities"])) for r, o in zip(ref, out)]
    figures.update(argmax_agreement=float(np.mean(agree)), n_bags=len(agree))
    return figures


GATES = ("all", "whole_bag")
INFORMATION = ("features", "sub_bags", "end_to_end", "head", "probabilities", "argmax_agreement")


def whole_bag_figures(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, Any]:
    """One bag's head outputs, reference vs candidate: |d probability| and both predicted classes."""
    ref_class, out_class = int(np.argmax(ref["probabilities"])), int(np.argmax(out["probabilities"]))
    return {"probabilities": difference(ref["probabilities"], out["probabilities"]),
            "reference_class": ref_class, "candidate_class": out_class, "identical_class": ref_class == out_class}


def measure_parity(ref: RunnerPair, cand: RunnerPair, tiles: np.ndarray, cfg: ParityConfig,
                   tolerance: float, gate: str = "all") -> dict[str, Any]:
    """Parity figures of ``cand`` against ``ref`` on ``tiles`` (see the module docstring).

    ``gate="all"``: ``passed`` needs every bag within ``tolerance`` and argmax agreement >= 0.999.
    ``gate="whole_bag"``: ``passed`` needs the bag of all ``tiles`` within ``tolerance`` with the same
    predicted class; the other figures are kept, listed under ``information``, and do not gate.
    """
    if gate not in GATES:
        raise ValueError(f"parity gate {gate!r}: use one of {GATES}")
    rng = np.random.default_rng(cfg.seed)
    biggest = max(cfg.batch_sizes)
    ref_feats = run_backbone(ref.backbone, tiles, biggest)
    cand_feats = run_backbone(cand.backbone, tiles, biggest)
    per_batch = [difference(ref_feats[:b], cand.backbone.infer({"tiles": tiles[:b]})["features"])
                 for b in cfg.batch_sizes if b < biggest]
    features = {**_worst(difference(ref_feats, cand_feats), *per_batch),
                "min_cosine": _min_cosine(ref_feats, cand_feats), "batch_sizes": list(cfg.batch_sizes)}
    n = len(tiles)
    subsets = [np.arange(n)] + [rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
                                for _ in range(cfg.n_slide_bags)]
    ref_bags = _score(ref.head, [ref_feats[i] for i in subsets])
    cand_bags = _score(cand.head, [cand_feats[i] for i in subsets])
    end_to_end = compare_bags(ref_bags, cand_bags)
    spread = ref_feats.std(axis=0, keepdims=True) + 1e-6
    bags = [ref_feats[rng.integers(0, n, size)] + 0.5 * spread * rng.standard_normal((size, ref_feats.shape[1]))
            for size in cfg.bag_sizes]
    head = {**compare_bags(_score(ref.head, bags), _score(cand.head, bags)), "bag_sizes": list(cfg.bag_sizes)}
    probabilities = _worst(end_to_end["probabilities"], head["probabilities"])
    n_bags = end_to_end["n_bags"] + head["n_bags"]
    agreement = (end_to_end["argmax_agreement"] * end_to_end["n_bags"]
                 + head["argmax_agreement"] * head["n_bags"]) / n_bags
    passed = probabilities["max_abs"] <= tolerance and agreement >= MIN_ARGMAX_AGREEMENT
    figures = {"features": features, "end_to_end": end_to_end, "head": head, "probabilities": probabilities,
               "argmax_agreement": agreement, "n_bags": n_bags, "tolerance": tolerance, "passed": bool(passed)}
    if gate == "all":
        return figures
    whole = {"n_tiles": n, **whole_bag_figures(ref_bags[0], cand_bags[0])}
    whole["passed"] = bool(whole["probabilities"]["max_abs"] <= tolerance and whole["identical_class"])
    sub_bags = {**compare_bags(ref_bags[1:], cand_bags[1:]), "sizes": [int(len(i)) for i in subsets[1:]]} \
        if len(subsets) > 1 else None
    return {**figures, "gate": "whole_bag", "whole_bag": whole, "sub_bags": sub_bags, "passed": whole["passed"],
            "information": {"figures": [k for k in INFORMATION if k != "sub_bags" or sub_bags],
                            "all_bags_within_tolerance": bool(passed),
                            "note": "not gating: random sub-bags (down to one tile) and noisy head bags"}}


def gate_summary(figures: dict[str, Any]) -> str:
    """What decided ``passed``, in one line."""
    verdict = "passed" if figures["passed"] else "FAILED"
    if figures.get("gate") != "whole_bag":
        return f"every bag and figure gates: {summary(figures)}"
    whole = figures["whole_bag"]
    classes = whole.get("classes", {})
    ref_class = classes.get("reference", whole["reference_class"])
    cand_class = classes.get("candidate", whole["candidate_class"])
    same = f"same class ({ref_class})" if whole["identical_class"] else f"classes DIFFER ({ref_class} vs {cand_class})"
    return (f"gate: whole bag of {whole['n_tiles']} tiles |d prob| {whole['probabilities']['max_abs']:.2e} "
            f"(tolerance {figures['tolerance']:.0e}), {same}: {verdict}")


def information_summary(figures: dict[str, Any]) -> str:
    """The figures that inform but do not gate (``gate="whole_bag"``), in one line."""
    parts = []
    sub = figures.get("sub_bags")
    if sub:
        parts.append(f"{sub['n_bags']} random sub-bags of {min(sub['sizes'])}-{max(sub['sizes'])} tiles |d prob| "
                     f"{sub['probabilities']['max_abs']:.2e}, argmax agreement {sub['argmax_agreement']:.4f}")
    head = figures["head"]
    parts.append(f"head bags of {'/'.join(str(b) for b in head['bag_sizes'])} noisy features |d prob| "
                 f"{head['probabilities']['max_abs']:.2e}, argmax agreement {head['argmax_agreement']:.4f}")
    feats = figures["features"]
    parts.append(f"|d feature| {feats['max_abs']:.2e} (rel {feats['max_rel']:.2e}, min cosine "
                 f"{feats['min_cosine']:.6f})")
    within = "within" if figures["information"]["all_bags_within_tolerance"] else "beyond"
    return f"information, not gating: {'; '.join(parts)} (all bags {within} {figures['tolerance']:.0e})"


def summary(figures: dict[str, Any]) -> str:
    """One line: |dprob|, features, argmax agreement, verdict (gate and information with a whole-bag gate)."""
    if figures.get("gate") == "whole_bag":
        return f"{gate_summary(figures)}; {information_summary(figures)}"
    return (f"|d prob| {figures['probabilities']['max_abs']:.2e} (tolerance {figures['tolerance']:.0e}), "
            f"|d feature| {figures['features']['max_abs']:.2e} (rel {figures['features']['max_rel']:.2e}, "
            f"min cosine {figures['features']['min_cosine']:.6f}), argmax agreement "
            f"{figures['argmax_agreement']:.4f} over {figures['n_bags']} bags: "
            f"{'passed' if figures['passed'] else 'FAILED'}")


def parity_gate(precision: str) -> str:
    """fp32 must match everywhere; a reduced precision is judged on the whole bag, as a slide is scored."""
    return "all" if precision == "fp32" else "whole_bag"


def fit_profiles(cfg: ParityConfig, max_batch: int, tensorrt: dict[str, Any]) -> ParityConfig:
    """Batch and bag sizes capped by the package's max batch and the TensorRT profiles."""
    from dataclasses import replace
    profiles = tensorrt.get("profiles", {})
    max_batch = min([max_batch] + [p["max"][0] for p in profiles.get("backbone", {}).values()])
    max_bag = min([max(cfg.bag_sizes)] + [p["max"][0] for p in profiles.get("head", {}).values()])
    return replace(cfg, batch_sizes=tuple(sorted({min(b, max_batch) for b in cfg.batch_sizes})),
                   bag_sizes=tuple(sorted({min(b, max_bag) for b in cfg.bag_sizes})))
