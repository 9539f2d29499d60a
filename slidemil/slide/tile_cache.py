"""Decoded file tiles kept for output tiles that straddle them, shared by the sources open on one file.

``LruTiles`` is a thread-safe LRU keyed by (level, tile index). A thread that misses claims the key,
and other threads wanting the same tile wait for it rather than decode it too. The engine gives each
reader thread its own tile source and deals batches round-robin, so the sources open on one file in
this process share one cache (``acquire_file_cache``), or else straddled file tiles would be decoded
once per thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


class Claim:
    """A tile one thread is decoding; others wait on ``done`` and take ``value`` (None if it failed)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None


class LruTiles:
    """Decoded file tiles keyed by (level, tile index), least recently used dropped first; thread-safe.

    A thread that misses claims the key; other threads wanting it wait for it instead of decoding it too.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._pending: dict[tuple[int, int], Claim] = {}
        self._lock = threading.Lock()

    def claim(self, key: tuple[int, int]) -> tuple[Any, Claim | None]:
        """(tile, None) if cached; (None, claim) if another thread decodes it; (None, None): decode it, then put."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item, None
            if key in self._pending:
                return None, self._pending[key]
            self._pending[key] = Claim()
            return None, None

    def put(self, key: tuple[int, int], value: Any) -> None:
        """Store a decoded tile (None: the decode failed) and release the threads waiting for it."""
        with self._lock:
            if value is not None:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            claim = self._pending.pop(key, None)
        if claim is not None:
            claim.value = value
            claim.done.set()


_SHARED: dict[tuple[Any, ...], tuple[LruTiles, int]] = {}
_SHARED_LOCK = threading.Lock()


def acquire_file_cache(path: Path, capacity: int) -> tuple[tuple[Any, ...], LruTiles]:
    """The CPU tile cache of this file (same path, inode, size and mtime), shared by its open sources.

    Returns:
        The key to give back to ``release_file_cache`` when the source closes, and the cache.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _SHARED_LOCK:
        cache, users = _SHARED.get(key) or (LruTiles(capacity), 0)
        _SHARED[key] = (cache, users + 1)
    return key, cache


def release_file_cache(key: tuple[Any, ...]) -> None:
    """One source of the file is done with its cache; the last one drops it."""
    with _SHARED_LOCK:
        cache, users = _SHARED.pop(key)
        if users > 1:
            _SHARED[key] = (cache, users - 1)


__all__ = ["Claim", "LruTiles", "acquire_file_cache", "release_file_cache"]
