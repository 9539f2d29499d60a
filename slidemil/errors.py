"""Typed errors: each says what went wrong and what the user can do about it."""

from __future__ import annotations


class SlidemilError(Exception):
    """Base class of every error slidemil raises on purpose."""


class SlideOpenError(SlidemilError):
    """A slide file cannot be opened (missing, unsupported format, corrupt header)."""


class SlideReadError(SlidemilError):
    """Pixels of an opened slide cannot be read (corrupt tile data)."""


class MissingMppError(SlidemilError):
    """A slide carries no microns-per-pixel and none was given."""


class ResolutionError(SlidemilError):
    """A slide's resolution does not fit the tiling (scanned coarser than the target mpp)."""


class NoTissueError(SlidemilError):
    """Tissue detection found nothing to tile."""


class StoreError(SlidemilError):
    """A coords or features h5 file is missing, truncated, or not ours."""


class LabelTableError(SlidemilError):
    """A slide/label table does not match the data it describes."""


class ConfigError(SlidemilError):
    """A setting is unknown or has an invalid value."""


class WeightsError(SlidemilError):
    """Model weights cannot be loaded or do not match the model."""


class CheckpointError(SlidemilError):
    """A training checkpoint is missing, incomplete or inconsistent."""


class PackageError(SlidemilError):
    """A model package is incomplete, tampered with, or of an unknown schema."""


class ExportError(SlidemilError):
    """Export to ONNX or TensorRT failed or missed its parity threshold."""


class BackendUnavailableError(SlidemilError):
    """An inference backend (TensorRT, OpenVINO, CUDA, ...) is not installed or has no device."""
