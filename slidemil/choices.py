"""The choices users make by name, as ``Literal`` types: one definition each.

Config dataclasses annotate their fields with these; ``slidemil.config.from_dict`` checks a value
against the Literal once, when a config is built (from YAML, the command line or a saved record),
and the CLI offers the same values (``choices_of``).
"""

from __future__ import annotations

import typing
from typing import Literal

Backend = Literal["auto", "tensorrt", "onnxruntime", "openvino", "torch"]
ExtractBackend = Literal["auto", "torch", "onnxruntime", "openvino"]
DeviceKind = Literal["auto", "cpu", "cuda"]  # a config may also name "cuda:N"; see runtime.runners.resolve_device
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
CompileMode = Literal["auto", "on", "off"]
AttentionNorm = Literal["percentile", "minmax", "softmax", "raw"]
TileSourceKind = Literal["auto", "openslide", "jpeg"]
DecodeMode = Literal["auto", "cpu", "device"]  # where JPEG tiles are decoded (runtime.plan decides "auto")
TissueMethod = Literal["otsu", "whole", "mask"]
MilType = Literal["clam_mb", "clam_sb", "dsmil", "gated", "simple", "transmil"]
TrainingMode = Literal["features", "end2end"]
LossName = Literal["ce", "focal"]
Scheduler = Literal["cosine", "plateau", "none"]
SelectRule = Literal["last", "best"]  # which epoch's weights a training run keeps
InitChoice = Literal["val_loss", "average"]  # what a run trained from several initialisations keeps
SlideContrast = Literal["auto", "on", "off"]  # ABMIL heads classifying tiles relative to their slide's mean tile
CONTRAST_HEADS = ("gated", "simple")  # the heads that have slide contrast (ABMIL)
Exporter = Literal["auto", "dynamo", "legacy"]
BatchNormMode = Literal["frozen", "train"]
AmpDtype = Literal["float16", "bfloat16"]


def choices_of(literal: object) -> list[str]:
    """The values of a Literal type, for ``argparse`` ``choices``."""
    return [str(v) for v in typing.get_args(literal)]
