"""verify's parity gate: fp32 everywhere, reduced precisions on the whole bag (sub-bags inform).

Fake runners in numpy make the case exact: the candidate backbone's feature errors cancel over the
whole bag but not over sub-bags, and an over-confident head turns them into large probability
changes in the sub-bags only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slidemil.exporter.parity import ParityConfig, measure_parity, parity_gate, summary
from slidemil.exporter.verify import VerifyReport
from slidemil.runtime.plan import RunnerPair

N_TILES = 16
CFG = ParityConfig(n_tiles=N_TILES, batch_sizes=(1, 7, 16), bag_sizes=(1, 50), n_slide_bags=8)
SHARPNESS = 1000.0  # logit change per unit of feature 0


class Backbone:
    """Features of a tile from its pixels; the candidate adds +-error to feature 0, by the tile's marker."""

    def __init__(self, error: float = 0.0, balanced: bool = True) -> None:
        self.error, self.balanced = error, balanced

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tiles = feed["tiles"]
        marker = tiles[:, 0, 0, 0].astype(np.float32)
        feats = np.stack([np.ones(len(tiles), np.float32), tiles[:, 1, 1, 0] / 255.0,
                          tiles[:, 2, 2, 1] / 255.0], axis=1).astype(np.float32)
        sign = np.where(marker % 2 == 0, 1.0, -1.0) if self.balanced else np.ones(len(tiles))
        feats[:, 0] += (self.error * sign).astype(np.float32)
        return {"features": feats}

    def close(self) -> None:
        pass


class Head:
    """Mean pooling; logit gap = SHARPNESS * (mean feature 0 - 1) + 1: p(class 1) = 0.73 on the reference."""

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = feed["features"].astype(np.float64)
        gap = SHARPNESS * (feats[:, 0].mean() - 1.0) + 1.0
        logits = np.array([0.0, gap])
        probs = np.exp(logits - logits.max())
        attention = np.full(len(feats), 1.0 / len(feats))
        return {"logits": logits.astype(np.float32), "probabilities": (probs / probs.sum()).astype(np.float32),
                "attention": attention.astype(np.float32), "attention_raw": np.zeros(len(feats), np.float32)}

    def close(self) -> None:
        pass


def _tiles() -> np.ndarray:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (N_TILES, 8, 8, 3), dtype=np.uint8)
    tiles[:, 0, 0, 0] = np.arange(N_TILES)  # the marker: half the tiles err up, half down
    return tiles


def _measure(gate: str, error: float = 1e-3, balanced: bool = True) -> dict:
    ref = RunnerPair(Backbone(), Head())
    cand = RunnerPair(Backbone(error, balanced), Head())
    return measure_parity(ref, cand, _tiles(), CFG, 1e-2, gate=gate)


def test_reduced_precision_passes_on_the_whole_bag_while_sub_bags_swing():
    figures = _measure("whole_bag")
    whole = figures["whole_bag"]
    assert figures["passed"] and whole["passed"] and whole["n_tiles"] == N_TILES
    assert whole["probabilities"]["max_abs"] <= 1e-5 and whole["identical_class"]
    assert figures["sub_bags"]["probabilities"]["max_abs"] > 0.1  # information, not the gate
    assert figures["sub_bags"]["n_bags"] == CFG.n_slide_bags
    info = figures["information"]
    assert not info["all_bags_within_tolerance"] and "not gating" in info["note"]
    assert {"sub_bags", "head", "features"} <= set(info["figures"])


def test_fp32_gate_still_needs_every_bag():
    figures = _measure("all")
    assert not figures["passed"]
    assert set(figures) == {"features", "end_to_end", "head", "probabilities", "argmax_agreement", "n_bags",
                            "tolerance", "passed"}  # the figures of export and build-engine, as before
    assert _measure("all", error=0.0)["passed"]


def test_a_whole_bag_miss_fails_the_reduced_precision_gate():
    figures = _measure("whole_bag", balanced=False)
    assert not figures["passed"] and figures["whole_bag"]["probabilities"]["max_abs"] > 0.1
    assert "FAILED" in summary(figures)


def test_the_gate_follows_the_precision():
    assert parity_gate("fp32") == "all"
    assert {parity_gate(p) for p in ("bf16", "fp16", "int8")} == {"whole_bag"}
    with pytest.raises(ValueError, match="gate"):
        _measure("sub_bags")


def test_report_lines_say_what_gates_and_what_informs():
    figures = _measure("whole_bag")
    figures["whole_bag"]["classes"] = {"reference": "tumour", "candidate": "tumour"}
    parity = {"reference": "onnxruntime fp32 (cpu)", "candidate": "openvino bf16", "precision": "bf16",
              "tiles": "synthetic slide", **figures}
    report = VerifyReport(Path("model"), "openvino", "bf16", parity=parity)
    gate, info = report.lines()
    assert gate.split()[0] == "ok" and f"gate: whole bag of {N_TILES} tiles" in gate and "same class (tumour)" in gate
    assert info.split()[0] == "info" and "information, not gating" in info and "random sub-bags" in info
    assert report.ok and report.to_dict()["parity"]["gate"] == "whole_bag"

    strict = {"reference": "onnxruntime fp32 (cpu)", "candidate": "openvino fp32", "precision": "fp32",
              "tiles": "synthetic slide", **_measure("all")}
    (line,) = VerifyReport(Path("model"), "openvino", "fp32", parity=strict).lines()
    assert line.split()[0] == "failed" and "every bag and figure gates" in line
