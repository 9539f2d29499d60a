"""The model package: a folder the exporter writes and the engine reads, described by ``manifest.json``.

Layout (paths relative to the package folder)::

    manifest.json                  # written last; lists every other file with its sha256
    backbone.onnx  head.onnx       # fp32 graphs (uint8 NHWC tiles -> features; features -> outputs)
    backbone_fp16.onnx ...         # optional fp16 copies (float32/uint8 interface kept)
    backbone_fp16.plan ...         # optional TensorRT engines (one GPU model + TensorRT version)
    backbone_int8.xml  .bin        # optional int8 OpenVINO backbone (``slidemil quantize``)
    torch/backbone.safetensors  torch/backbone_card.json  torch/head.safetensors  torch/head_config.json

:func:`load_package` refuses a package whose schema version it does not know, whose manifest lists a
file that is missing, or whose file bytes do not match the recorded sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, overload

from slidemil import __version__, config
from slidemil.atomic import TMP_MARK, write_json
from slidemil.errors import ConfigError, PackageError
from slidemil.models.backbones import CARD_FILE, WEIGHTS_FILE, BackboneCard
from slidemil.models.mil import HeadConfig
from slidemil.slide.grid import TileSpec
from slidemil.slide.tiling import TilingConfig
from slidemil.slide.tissue import TissueConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TORCH_DIR = "torch"
HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
GRAPH_KINDS = ("backbone", "head")
_VERSIONED = ("slidemil", "torch", "onnx", "onnxruntime", "onnxscript", "timm", "numpy", "safetensors",
              "openvino", "nncf", "tensorrt")


def graph_file(kind: str, precision: str = "fp32") -> str:
    """File name of an ONNX graph: ``backbone.onnx``, ``head_fp16.onnx``..."""
    return f"{kind}.onnx" if precision == "fp32" else f"{kind}_{precision}.onnx"


def engine_file(kind: str, precision: str) -> str:
    """File name of a TensorRT engine: ``backbone_fp16.plan``..."""
    return f"{kind}_{precision}.plan"


@dataclass(frozen=True)
class InputSpec:
    """What ``backbone.onnx`` takes: uint8 RGB tiles, NHWC, normalised inside the graph."""

    name: str
    shape: tuple[Any, ...]  # ["batch", H, W, 3]
    dtype: str = "uint8"
    layout: str = "NHWC"
    channels: str = "RGB"
    normalisation_in_graph: dict[str, Any] = field(default_factory=dict)  # {"mean": [..], "std": [..]}


@dataclass(frozen=True)
class MilSpec:
    """The MIL head: type and widths, the temperature folded into its logits, and its outputs.

    ``n_heads``, ``landmarks``, ``pinv_iterations`` (TransMIL), ``outputs``, ``ensemble`` (heads averaged in
    ``head.onnx``), ``slide_contrast`` and ``member_contrast`` (in the graph; recorded for the reader) were added
    later: a manifest without them is a single gated or simple head with the four outputs.
    """

    type: str
    in_dim: int
    n_classes: int
    hidden_dim: int
    attention_dim: int
    temperature: float
    n_heads: int = 8
    landmarks: int = 128
    pinv_iterations: int = 6
    outputs: tuple[str, ...] = ("logits", "probabilities", "attention", "attention_raw")
    ensemble: int = 1
    slide_contrast: bool = False
    member_contrast: tuple[bool, ...] = ()


@dataclass(frozen=True)
class FileEntry:
    """A file of the package with its checksum."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json`` (schema version 1).

    Attributes:
        graphs: ``{"backbone": {"fp32": "backbone.onnx", "fp16": ...}, "head": {...}}``.
        torch: relative paths of the torch weights: ``backbone``/``head`` folders and files.
        files: every file except the manifest, relative path -> sha256 and size.
        parity: figures measured at export (torch vs ONNX Runtime).
        export: provenance: checkpoint file, mode, epoch, exporter, max batch, seconds.
        tensorrt: engines, profiles, GPU name, compute capability, TensorRT version; None if absent.
        openvino: ``{"int8": {"backbone": "backbone_int8.xml", "weights": ..., "calibration": ...,
            "parity": ...}}`` from ``slidemil quantize``; None if absent.
        operating_point: ``{"class": name, "threshold": t, "chosen_on": ..., ...}``: the engine predicts
            ``class`` where its probability is at least ``t`` (else the most probable other class);
            None (older packages, multi-class heads): the most probable class.
    """

    schema_version: int
    created: str
    class_names: tuple[str, ...]
    tile: TileSpec
    tissue: TissueConfig
    backbone: BackboneCard
    input: InputSpec
    mil: MilSpec
    opset: int
    max_batch: int
    graphs: dict[str, dict[str, str]]
    torch: dict[str, str]
    files: dict[str, FileEntry]
    library_versions: dict[str, str]
    parity: dict[str, Any]
    export: dict[str, Any]
    tensorrt: dict[str, Any] | None = None
    openvino: dict[str, Any] | None = None
    operating_point: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form (the bytes of ``manifest.json``)."""
        data = config.to_dict(dataclasses.replace(self, files={}))
        data["files"] = {rel: config.to_dict(entry) for rel, entry in self.files.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and check a manifest dict; unknown or missing keys raise ConfigError."""
        data = dict(data)
        files = {str(k): config.from_dict(FileEntry, v) for k, v in dict(data.pop("files", {})).items()}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.name != "files" and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"manifest lacks {missing}")
        manifest = config.from_dict(cls, {**data, "files": {}})
        return dataclasses.replace(manifest, files=files)


@dataclass(frozen=True)
class Package:
    """A loaded, checked model package: everything the engine needs, by path or value."""

    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        return self.root / relative

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def tiling(self) -> TilingConfig:
        """The tiling the model was trained with (tile geometry and tissue detection)."""
        return TilingConfig(tile=self.manifest.tile, tissue=self.manifest.tissue)

    @property
    def card(self) -> BackboneCard:
        return self.manifest.backbone

    @property
    def tile_px(self) -> int:
        """Edge in pixels of the uint8 tiles ``backbone.onnx`` takes."""
        return int(self.manifest.input.shape[1])

    @property
    def head_config(self) -> HeadConfig:
        mil = self.manifest.mil
        return HeadConfig(mil_type=mil.type, in_dim=mil.in_dim, n_classes=mil.n_classes,
                          hidden_dim=mil.hidden_dim, attention_dim=mil.attention_dim, n_heads=mil.n_heads,
                          landmarks=mil.landmarks, pinv_iterations=mil.pinv_iterations, ensemble=mil.ensemble,
                          slide_contrast=mil.slide_contrast, member_contrast=mil.member_contrast)

    def precisions(self, kind: str = "backbone", fmt: str = "onnx") -> tuple[str, ...]:
        """Precisions present for a graph kind, as ONNX graphs or TensorRT engines."""
        if fmt == "onnx":
            return tuple(self.manifest.graphs.get(kind, {}))
        engines = (self.manifest.tensorrt or {}).get("engines", {})
        return tuple(p for p, files in engines.items() if kind in files)

    def graph(self, kind: str, precision: str = "fp32") -> Path:
        """Path of an ONNX graph; PackageError naming what is there when absent."""
        try:
            return self.path(self.manifest.graphs[kind][precision])
        except KeyError:
            raise PackageError(f"{self.root} has no {precision} {kind} graph (it has "
                               f"{list(self.precisions(kind))}); re-export with --fp16 for fp16 graphs") from None

    def engine(self, kind: str, precision: str = "fp16") -> Path:
        """Path of a TensorRT engine; PackageError saying how to build one when absent."""
        try:
            return self.path(self.manifest.tensorrt["engines"][precision][kind])  # type: ignore[index]
        except (KeyError, TypeError):
            raise PackageError(f"{self.root} has no {precision} TensorRT engine for the {kind}; build one on "
                               f"this GPU with: slidemil build-engine {self.root} --{precision}") from None

    @property
    def backbone_onnx(self) -> Path:
        return self.graph("backbone")

    @property
    def head_onnx(self) -> Path:
        return self.graph("head")

    @overload
    def openvino_int8(self, missing_ok: Literal[False] = False) -> Path: ...

    @overload
    def openvino_int8(self, missing_ok: bool) -> Path | None: ...

    def openvino_int8(self, missing_ok: bool = False) -> Path | None:
        """The int8 OpenVINO backbone (``backbone_int8.xml``); PackageError saying how to make one when absent."""
        entry = (self.manifest.openvino or {}).get("int8")
        if entry is None:
            if missing_ok:
                return None
            raise PackageError(f"{self.root} has no int8 backbone; make one with: slidemil quantize {self.root} "
                               "--slides SLIDES (slides like those you will score)")
        return self.path(entry["backbone"])

    @property
    def torch_dir(self) -> Path:
        """Folder of the torch weights (``backbone.safetensors``, ``head.safetensors`` and their JSON)."""
        return self.root / TORCH_DIR


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_files(root: Path) -> dict[str, FileEntry]:
    """Every file under ``root`` except the manifest and temporaries, with sha256 and size."""
    entries = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_FILE and not p.name.startswith(TMP_MARK):
            entries[rel] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
    return entries


def library_versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Versions of the libraries that made (or ran) a package; absent ones are left out."""
    versions = {"python": platform.python_version(), "slidemil": __version__}
    for name in _VERSIONED[1:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {**versions, **(extra or {})}


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(root: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file of the package into ``manifest.files`` and write ``manifest.json`` atomically.

    Call it last: the manifest is what makes a folder a package.
    """
    root = Path(root)
    manifest = dataclasses.replace(manifest, files=package_files(root))
    for kind, graphs in manifest.graphs.items():
        for rel in graphs.values():
            if rel not in manifest.files:
                raise PackageError(f"manifest names {kind} graph {rel}, which is not in {root}")
    write_json(root / MANIFEST_FILE, manifest.to_dict())
    return manifest


def read_manifest(root: str | Path) -> Manifest:
    """Parse ``manifest.json`` and check its schema version (no checksums)."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{path} is missing: {root} is not a model package (or its export was interrupted); "
                           "make one with: slidemil export --checkpoint CKPT --out MODEL_DIR")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path} is not readable JSON ({exc}); re-export the package") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise PackageError(f"{path} has schema_version {version!r}, but this slidemil ({__version__}) reads "
                           f"schema {SCHEMA_VERSION}; re-export the checkpoint with this slidemil "
                           "(slidemil export) or install the slidemil version that made the package")
    try:
        return Manifest.from_dict(data)
    except ConfigError as exc:
        raise PackageError(f"{path} does not follow manifest schema {SCHEMA_VERSION}: {exc}; "
                           "re-export the package") from exc


def check_files(root: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists with its recorded size and sha256 (PackageError if not)."""
    fix = "re-export the package (slidemil export), or copy it again from its source"
    for rel, entry in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise PackageError(f"{path} is listed in {MANIFEST_FILE} but missing; {fix}")
        size = path.stat().st_size
        sha = sha256_file(path) if size == entry.bytes else None
        if sha != entry.sha256:
            found = f"sha256 {sha[:16]}..." if sha else f"{size} bytes"
            expected = f"sha256 {entry.sha256[:16]}..." if sha else f"{entry.bytes} bytes"
            raise PackageError(f"{path} has {found} but {MANIFEST_FILE} records {expected}: the file was changed "
                               f"after export (tampered or corrupted); {fix}")
    listed = set(manifest.files) | {MANIFEST_FILE}
    extra = [rel for rel in package_files(root) if rel not in listed]
    if extra:
        log.warning("%s holds files its manifest does not list (ignored): %s", root, extra[:5])


def load_package(root: str | Path, check_checksums: bool = True) -> Package:
    """Read and check a model package.

    Args:
        root: the package folder.
        check_checksums: verify every file's sha256 (the engine always does).

    Raises:
        PackageError: no manifest, an unknown schema version, a missing file, or a file whose
            sha256 differs from the manifest (each naming the file and the fix).
    """
    root = Path(root)
    manifest = read_manifest(root)
    if check_checksums:
        check_files(root, manifest)
    return Package(root=root, manifest=manifest)


def load_torch_models(package: Package) -> tuple[Any, Any]:
    """The package's torch modules ``(UInt8Backbone, BagHead)`` for the torch runner (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from slidemil.errors import WeightsError
    from slidemil.models.backbones import load_backbone
    from slidemil.models.mil import BagHead, create_head
    from slidemil.models.preprocess import UInt8Backbone

    folder = package.torch_dir
    try:
        backbone, card = load_backbone(folder)
    except WeightsError as exc:
        raise PackageError(f"{folder}: {exc}") from exc
    if card.weights_sha256 != package.card.weights_sha256:
        raise PackageError(f"{folder / CARD_FILE} describes weights {card.weights_sha256[:12]}... but "
                           f"{MANIFEST_FILE} records {package.card.weights_sha256[:12]}...; re-export the package")
    head_cfg = HeadConfig.from_dict(json.loads((folder / HEAD_CONFIG_FILE).read_text()))
    head = create_head(head_cfg)
    try:
        head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS_FILE)))
    except (RuntimeError, SafetensorError) as exc:
        raise PackageError(f"{folder / HEAD_WEIGHTS_FILE} does not fit {head_cfg}: {exc}") from exc
    return UInt8Backbone(backbone, card).eval(), BagHead(head)


TORCH_FILES = {"dir": TORCH_DIR, "backbone_weights": f"{TORCH_DIR}/{WEIGHTS_FILE}",
               "backbone_card": f"{TORCH_DIR}/{CARD_FILE}", "head_weights": f"{TORCH_DIR}/{HEAD_WEIGHTS_FILE}",
               "head_config": f"{TORCH_DIR}/{HEAD_CONFIG_FILE}"}
