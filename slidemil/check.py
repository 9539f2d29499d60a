"""``slidemil check``: hold files against the project's contracts (docs/formats.md) and say what is wrong.

A path may be a coords or features h5 file, a folder of them (searched recursively), a features or
run folder (its backbone card and tiling record too), a checkpoint, or a model package. Every finding
lists its problems; nothing here raises for a bad file, so one run reports a whole cohort.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slidemil import config
from slidemil.errors import SlidemilError
from slidemil.slide.store import check_h5

log = logging.getLogger(__name__)

CARD_PATH = Path("backbone") / "backbone_card.json"
TILING_FILE = "tiling_config.json"


@dataclass(frozen=True)
class Finding:
    """What one file or package is, and how it departs from its contract (no problems: it holds)."""

    path: Path
    kind: str
    problems: tuple[str, ...] = ()
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "kind": self.kind, "ok": self.ok, "problems": list(self.problems),
                "detail": self.detail}


@dataclass
class CheckReport:
    """Every finding of a ``check`` run."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def summary(self) -> str:
        bad = sum(not f.ok for f in self.findings)
        kinds = sorted({f.kind for f in self.findings})
        return (f"{len(self.findings) - bad} of {len(self.findings)} hold their contract ({', '.join(kinds)})"
                if self.findings else "nothing to check")


def check_paths(paths: Iterable[str | Path]) -> CheckReport:
    """Check every path (see the module docstring)."""
    report = CheckReport()
    for path in paths:
        report.findings.extend(check_path(Path(path)))
    return report


def check_path(path: Path) -> list[Finding]:
    """Findings for one path, recognised by what it holds."""
    if _is_checkpoint(path):
        return [check_checkpoint(path)]
    if not path.exists():
        return [Finding(path, "missing", ("no such file or folder",))]
    if path.is_dir() and (path / "manifest.json").is_file():
        return [check_package(path)]
    if path.is_file() and path.suffix == ".h5":
        return [check_h5_file(path)]
    if path.is_file():
        return [Finding(path, "unknown", ("not a file slidemil checks: give an .h5 file, a checkpoint, a model "
                                          "package or a folder of them",))]
    return _check_folder(path)


def _check_folder(path: Path) -> list[Finding]:
    findings = []
    if (path / CARD_PATH).is_file():
        findings.append(check_backbone_card(path / CARD_PATH))
    if (path / TILING_FILE).is_file():
        findings.append(check_tiling_record(path / TILING_FILE))
    for name in ("checkpoint_best", "checkpoint_last"):
        if (path / f"{name}.json").is_file():
            findings.append(check_checkpoint(path / name))
    h5_files = sorted(p for p in path.rglob("*.h5") if not p.name.startswith("."))
    findings.extend(check_h5_file(p) for p in h5_files)
    if not findings:
        findings.append(Finding(path, "unknown", ("no h5 file, checkpoint, model package or record in this folder",)))
    return findings


def check_h5_file(path: Path) -> Finding:
    """The coords/features contract of one h5 file."""
    import h5py

    problems = check_h5(path)
    kind, detail = "coords", ""
    if not problems:
        with h5py.File(path, "r") as f:
            n = f["coords"].shape[0]
            if "features" in f:
                kind, detail = "features", f"{n} tiles x {f['features'].shape[1]} ({f['features'].attrs['encoder']})"
            else:
                detail = f"{n} tiles"
    return Finding(path, kind, tuple(problems), detail)


def check_package(root: Path) -> Finding:
    """Schema, checksums and a smoke inference of every graph, engine and the torch weights."""
    from slidemil.exporter.verify import verify_package

    try:
        report = verify_package(root, parity=None)
    except SlidemilError as exc:
        return Finding(root, "model package", (str(exc),))
    problems = tuple(f"{c.name}: {c.detail}" for c in report.checks if c.status == "failed")
    manifest = json.loads((root / "manifest.json").read_text())
    detail = (f"schema {manifest['schema_version']}, classes {manifest['class_names']}, backbone "
              f"{manifest['backbone']['name']}, {len(manifest['files'])} files; "
              + ", ".join(f"{c.name} {c.status}" for c in report.checks))
    return Finding(root, "model package", problems, detail)


def check_checkpoint(path: Path) -> Finding:
    """The record and weights of a checkpoint, and what export will need of it."""
    from slidemil.artifacts.checkpoint import checkpoint_base, load_weights, read_checkpoint

    base = checkpoint_base(path)
    try:
        record = read_checkpoint(base)
        load_weights(base)
        record.require_backbone()
        record.require_tiling()
    except SlidemilError as exc:
        return Finding(base, "checkpoint", (str(exc),))
    return Finding(base, "checkpoint", (), f"{record.mode}, epoch {record.epoch}, classes {list(record.class_names)}, "
                   f"{record.head_config.mil_type} head on {record.require_backbone().name}")


def check_backbone_card(path: Path) -> Finding:
    """A features folder's backbone card, and its weights where they are not fetched by name."""
    from slidemil.models.backbones import WEIGHTS_FILE, BackboneCard

    try:
        card = BackboneCard.from_dict(json.loads(path.read_text()))
    except (SlidemilError, ValueError, TypeError) as exc:
        return Finding(path, "backbone card", (f"does not parse ({exc}); extract the features again",))
    refetch = card.weights_source.startswith(("timm-pretrained", "hf-hub:"))
    if not refetch and not (path.parent / WEIGHTS_FILE).is_file():
        return Finding(path, "backbone card", (f"weights {card.weights_source} cannot be fetched by name and "
                                               f"{WEIGHTS_FILE} is missing beside the card",))
    return Finding(path, "backbone card", (), f"{card.name}, {card.feature_dim}-d, weights {card.weights_source}")


def check_tiling_record(path: Path) -> Finding:
    """A ``tiling_config.json`` (the tiling features and models were made with)."""
    from slidemil.slide.tiling import TilingConfig

    try:
        tiling = config.from_dict(TilingConfig, json.loads(path.read_text())["config"])
    except (SlidemilError, ValueError, KeyError, TypeError) as exc:
        return Finding(path, "tiling record", (f"does not parse ({exc}); tile again",))
    t = tiling.tile
    return Finding(path, "tiling record", (), f"{t.patch_size} px at {t.mpp} um/px, min tissue {t.min_tissue}, "
                   f"tissue {tiling.tissue.method}")


def _is_checkpoint(path: Path) -> bool:
    from slidemil.artifacts.checkpoint import checkpoint_base

    if path.is_dir():
        return False
    base = checkpoint_base(path)
    record = base.with_name(base.name + ".json")
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and "mode" in data and "head_config" in data
