"""The tiling folder of ``slidemil tile`` and the tiling record every later stage carries.

``TILES/coords/<slide_id>.h5`` holds each slide's tiles; ``tiling_config.json`` records how they were
cut (a :class:`~slidemil.slide.tiling.TilingConfig`). Feature extraction copies the record into its
features folder, training into its checkpoints, export into the package manifest: the engine then
tiles every slide exactly as the model was trained. Format: docs/formats.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from slidemil.atomic import write_text
from slidemil.config import from_dict, save_config
from slidemil.errors import ConfigError
from slidemil.slide.tiling import TilingConfig

log = logging.getLogger(__name__)

TILING_FILE = "tiling_config.json"
COORDS_DIR = "coords"


def coords_path(tiles_dir: str | Path, slide_id: str) -> Path:
    """``TILES/coords/<slide_id>.h5``: where ``slidemil tile`` writes a slide's coords."""
    return Path(tiles_dir) / COORDS_DIR / f"{slide_id}.h5"


def find_coords(tiles_dir: str | Path, slide_id: str) -> Path:
    """A slide's coords file in a tiling folder, or in a flat folder of h5 files (CLAM's layout)."""
    nested = coords_path(tiles_dir, slide_id)
    flat = Path(tiles_dir) / f"{slide_id}.h5"
    return flat if not nested.is_file() and flat.is_file() else nested


def write_tiling_record(folder: str | Path, tiling: TilingConfig, **extra: Any) -> None:
    """Write ``folder/tiling_config.json`` (with extra records such as the slides it was made for)."""
    save_config(tiling, Path(folder) / TILING_FILE, **extra)


def copy_tiling_record(source: str | Path | None, folder: str | Path, tiling: TilingConfig) -> None:
    """Record in ``folder`` the tiling its data came from: ``source``'s record, or ``tiling`` when the data
    were tiled on the fly (``source`` None)."""
    if source is None:
        write_tiling_record(folder, tiling)
        return
    path = Path(source) / TILING_FILE
    if path.is_file():
        write_text(Path(folder) / TILING_FILE, path.read_text())
    else:
        log.warning("%s has no %s; the tiling of these features is unrecorded", source, TILING_FILE)


def read_tiling_record(folder: str | Path) -> TilingConfig | None:
    """The tiling recorded in ``folder``, or None when there is none.

    Raises:
        ConfigError: the record exists but does not parse, naming the fix.
    """
    path = Path(folder) / TILING_FILE
    if not path.is_file():
        return None
    try:
        return from_dict(TilingConfig, json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a tiling record ({exc}); re-run `slidemil tile` (or `slidemil extract "
                          "--tile`) to write it again") from exc


def load_tiling(folder: str | Path) -> TilingConfig:
    """The tiling recorded in ``folder``; the default settings, with a warning, where none is recorded."""
    tiling = read_tiling_record(folder)
    if tiling is None:
        log.warning("%s: no %s; assuming default tiling settings", folder, TILING_FILE)
        return TilingConfig()
    return tiling
