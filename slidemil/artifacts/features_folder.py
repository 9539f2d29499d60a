"""The features folder of ``slidemil extract``: h5 files with the backbone they came from and their tiling.

```
FEAT/features/<slide_id>.h5      coords + features (slidemil.slide.store)
FEAT/backbone/backbone_card.json the backbone card; backbone.safetensors beside it unless refetchable
FEAT/tiling_config.json          the tiling record (slidemil.artifacts.tiling_record)
```

A head is only meaningful with the exact backbone whose features it was trained on, so the folder
records it. Users of CLAM point at the h5 folder itself (``h5_files/``): :func:`resolve_features_folder`
accepts ``FEAT/features`` and reads the records beside it. Format: docs/formats.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from slidemil.artifacts.tiling_record import TILING_FILE, read_tiling_record
from slidemil.atomic import write_json
from slidemil.errors import ConfigError
from slidemil.models.backbones import CARD_FILE, WEIGHTS_FILE, BackboneCard, save_backbone
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
BACKBONE_DIR = "backbone"
REFETCHABLE = ("timm-pretrained", "hf-hub:")  # weights sources fetched again by name


def features_path(out_dir: str | Path, slide_id: str) -> Path:
    """``FEAT/features/<slide_id>.h5``: where ``slidemil extract`` writes a slide's features."""
    return Path(out_dir) / FEATURES_DIR / f"{slide_id}.h5"


def is_refetchable(card: BackboneCard) -> bool:
    """Whether the card's weights can be fetched again by name (timm or the Hugging Face hub)."""
    return card.weights_source.startswith(REFETCHABLE)


@dataclass(frozen=True)
class FeaturesFolder:
    """Where a features run keeps its records (``backbone/``, ``tiling_config.json``) and its h5 files."""

    records: Path
    h5: Path

    def feature_file(self, slide_id: str) -> Path:
        """``h5/features/<id>.h5`` (``slidemil extract``'s layout), else ``h5/<id>.h5``."""
        nested = features_path(self.h5, slide_id)
        flat = self.h5 / f"{slide_id}.h5"
        return flat if not nested.is_file() and flat.is_file() else nested

    @property
    def backbone_dir(self) -> Path:
        return self.records / BACKBONE_DIR

    def backbone(self) -> tuple[BackboneCard | None, str | None]:
        """The backbone card and where its weights are (``"backbone/"`` or ``"refetch"``); (None, None),
        with a warning, for features written by another tool.

        Raises:
            ConfigError: a card that does not parse, or one whose weights are neither beside it nor
                refetchable.
        """
        card_path = self.backbone_dir / CARD_FILE
        if not card_path.is_file():
            log.warning("%s has no %s/%s: the checkpoints will not record the backbone, and the exporter will "
                        "refuse them; extract features with `slidemil extract`", self.records, BACKBONE_DIR, CARD_FILE)
            return None, None
        try:
            card = BackboneCard.from_dict(json.loads(card_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{card_path} is not a backbone card ({exc}); extract the features again") from exc
        if is_refetchable(card):
            return card, "refetch"
        if not (self.backbone_dir / WEIGHTS_FILE).is_file():
            raise ConfigError(f"{self.backbone_dir} has the card of {card.name!r} (weights {card.weights_source}) "
                              f"but not {WEIGHTS_FILE}; re-run `slidemil extract` into a new folder")
        return card, "backbone/"

    def tiling(self) -> TilingConfig | None:
        """The tiling the features came from; None, with a warning, when unrecorded."""
        tiling = read_tiling_record(self.records)
        if tiling is None:
            log.warning("%s has no %s: the checkpoints will not record the tiling", self.records, TILING_FILE)
        return tiling


def resolve_features_folder(path: str | Path) -> FeaturesFolder:
    """The features folder of ``path``: the folder ``slidemil extract`` wrote, or its h5 folder.

    Given ``FEAT/features`` (or any folder of h5 files without records of its own), the backbone card
    and tiling are read from the folder beside it.
    """
    path = Path(path)
    has_records = (path / BACKBONE_DIR).is_dir() or (path / TILING_FILE).is_file()
    parent = path.parent
    if not has_records and ((parent / BACKBONE_DIR / CARD_FILE).is_file() or (parent / TILING_FILE).is_file()):
        log.info("%s is an h5 folder: reading the backbone and tiling records of %s", path, parent)
        return FeaturesFolder(records=parent, h5=path)
    return FeaturesFolder(records=path, h5=path)


def record_backbone(out_dir: str | Path, model: object, card: BackboneCard) -> BackboneCard:
    """Record the backbone of the features about to be written in ``out_dir/backbone``: its card, and its
    weights unless they can be fetched again by name.

    Raises:
        ConfigError: ``out_dir`` already holds features of other backbone weights.
    """
    folder = Path(out_dir) / BACKBONE_DIR
    existing = folder / CARD_FILE
    if existing.is_file():
        old = json.loads(existing.read_text())
        if old.get("weights_sha256") != card.weights_sha256:
            raise ConfigError(f"{out_dir} already holds features of backbone {old.get('name')} "
                              f"(sha256 {str(old.get('weights_sha256'))[:12]}...); use a new --out folder "
                              "or the same backbone and weights")
    if is_refetchable(card):
        write_json(existing, card.to_dict())
        return card
    return save_backbone(model, card, folder)  # type: ignore[arg-type]
