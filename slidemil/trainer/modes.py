"""The training modes, by name (``--mode``): ``features`` (a head on cached features) and ``end2end``
(backbone and head on tiles read from the slides). Both build a :class:`slidemil.trainer.task.TrainingTask`."""

from __future__ import annotations

from collections.abc import Callable

from slidemil.errors import ConfigError
from slidemil.trainer.end2end import End2EndMode
from slidemil.trainer.features_mode import FeaturesMode
from slidemil.trainer.task import TrainingMode

MODES: dict[str, Callable[[], TrainingMode]] = {"features": FeaturesMode, "end2end": End2EndMode}


def get_mode(name: str) -> TrainingMode:
    """The training mode ``name``; ConfigError naming the modes there are."""
    if name not in MODES:
        raise ConfigError(f"unknown training mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]()
