"""Scripts of bench/ (not a package) loaded as modules, for the tests that check their logic."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


@contextlib.contextmanager
def bench_module(script: str) -> Iterator[ModuleType]:
    """``bench/<script>.py`` as the module ``bench_<script>``, registered in ``sys.modules`` while in use
    (dataclasses look their module up there); the scripts change nothing at import."""
    name = f"bench_{script}"
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
