"""Typed configuration: frozen dataclasses loaded from YAML with command-line overrides.

Each stage defines its own frozen dataclass next to the code that uses it (``TileSpec`` in
``slide.grid``, ``TrainConfig`` in ``trainer.config``...). This module holds the one piece of
machinery they share: building a dataclass from a mapping with unknown keys rejected, layering a
YAML file and overrides, and writing the resolved config beside the outputs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slidemil import __version__
from slidemil.atomic import write_json
from slidemil.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclasses are built recursively.

    Raises:
        ConfigError: on a key the dataclass does not have, naming the keys it does have.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        return tuple(value)
    if origin is typing.Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 (PyYAML) reads on and off as booleans
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 2e-4 as a string: only 2.0e-4 is a float there
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: {value!r} is not a {hint.__name__}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data form of a config dataclass (tuples become lists, paths strings)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(obj)


def load_config(cls: type[T], yaml_path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults <- YAML file <- overrides (``None`` values in overrides mean "not given").

    Overrides may use dotted keys for nested dataclasses (``tissue.thumb_mpp``).
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, data)


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that ignores ``None`` values (settings not given)."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key.sub: old -> new"`` for every setting that differs between two plain-data configs."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def save_config(obj: Any, path: str | Path, **extra: Any) -> None:
    """Write the resolved config (and any extra records) as JSON, atomically."""
    write_json(path, {"slidemil_version": __version__, **extra, "config": to_dict(obj)})
