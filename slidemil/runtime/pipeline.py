"""The tile pipeline: slides -> tissue and grid -> uint8 tile batches, read ahead by worker threads.

One producer thread walks the slides: it plans each slide's tiles (``plan_tiles``), then hands
batches of coords to a pool of reader threads, each holding its own tile source (file handle) for
the slide. Futures go into a bounded queue in tile order, so memory is bounded by
``queue_batches + workers`` batches whatever the slide size, and reading of the next slide starts
while the consumer is still running the model on the current one. The consumer (feature
extraction, scoring) iterates over ``SlideStream`` objects and their batches in order.

Feature extraction and scoring both run this pipeline; neither has a private copy of it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidemil.choices import TileSourceKind
from slidemil.errors import SlidemilError, SlideReadError
from slidemil.runtime.runners import Runner
from slidemil.slide.readers import open_slide
from slidemil.slide.sources import TileSource, open_tile_source
from slidemil.slide.table import SlideEntry
from slidemil.slide.tiling import TilePlan, TilingConfig, plan_tiles

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class PipelineConfig:
    """Reading settings: tiles per batch, reader threads, read-ahead depth, tile source."""

    batch_size: int = 32
    workers: int = 2
    queue_batches: int = 6
    tile_source: TileSourceKind = "auto"
    max_tiles: int | None = None


class _SourcePool:
    """One tile source per reader thread for one slide; closed when the slide is done."""

    def __init__(self, entry: SlideEntry, size_level0: int, out_px: int, kind: str) -> None:
        self._args = (entry.path, entry.mpp, size_level0, out_px, kind)
        self._local = threading.local()
        self._all: list[TileSource] = []
        self._lock = threading.Lock()

    def read(self, coords: np.ndarray, size_level0: int, out_px: int) -> np.ndarray:
        source = getattr(self._local, "source", None)
        if source is None:
            source = open_tile_source(*self._args)
            self._local.source = source
            with self._lock:
                self._all.append(source)
        return source.read(coords, size_level0, out_px)

    def close(self) -> None:
        with self._lock:
            for source in self._all:
                source.close()
            self._all.clear()


class SlideStream:
    """One slide flowing through the pipeline: its plan (or error) and its tile batches in order.

    The consumer takes ``batches()`` to the end, or calls ``drain()`` when it gives up on the slide,
    so that the read-ahead slots of the remaining batches are freed.
    """

    def __init__(self, entry: SlideEntry, plan: TilePlan | None, error: Exception | None,
                 slots: threading.BoundedSemaphore, max_tiles: int | None = None) -> None:
        self.entry = entry
        self.plan = plan
        self.error = error
        n = 0 if plan is None else len(plan.grid)
        self.n_tiles = min(n, max_tiles) if max_tiles else n  # fixed before the consumer sees the stream
        self._batches: queue.Queue[Any] = queue.Queue()
        self._slots = slots
        self._ended = False

    def _next(self) -> tuple[int, Future[np.ndarray]] | None:
        if self._ended:
            return None
        item = self._batches.get()
        if item is _END:
            self._ended = True
            return None
        self._slots.release()
        return item

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_tile_index, uint8 (B, H, W, 3))`` in tile order.

        Raises:
            SlidemilError: a read error of this slide (the caller records it, drains, and goes on).
        """
        while (item := self._next()) is not None:
            start, future = item
            yield start, future.result()

    def drain(self) -> None:
        """Discard the batches not taken (after an error), freeing their read-ahead slots."""
        while (item := self._next()) is not None:
            item[1].cancel()


class TilePipeline:
    """Iterate over slides with their tiles read ahead by a thread pool.

    Args:
        cfg: reading settings.
        tiling: tissue and grid settings (the model package's, or the tile command's).
        plan: optional replacement of ``plan_tiles`` (e.g. coords loaded from an h5 file).
    """

    def __init__(self, cfg: PipelineConfig, tiling: TilingConfig,
                 plan: Callable[[SlideEntry], TilePlan] | None = None) -> None:
        self.cfg = cfg
        self.tiling = tiling
        self._plan = plan or self._plan_from_slide
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="tile-reader")
        self._stop = threading.Event()

    def _plan_from_slide(self, entry: SlideEntry) -> TilePlan:
        with open_slide(entry.path, mpp=entry.mpp, slide_id=entry.slide_id) as reader:
            return plan_tiles(reader, self.tiling)

    def __enter__(self) -> TilePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, entries: list[SlideEntry]) -> Iterator[SlideStream]:
        """Yield a ``SlideStream`` per slide, in order; reading runs ahead in the background."""
        self._stop = threading.Event()
        streams: queue.Queue[Any] = queue.Queue(maxsize=2)
        slots = threading.BoundedSemaphore(max(1, self.cfg.queue_batches))
        producer = threading.Thread(target=self._produce, args=(entries, streams, slots), daemon=True,
                                    name="tile-planner")
        producer.start()
        try:
            while True:
                stream = streams.get()
                if stream is _END:
                    break
                yield stream
        finally:
            self._stop.set()
            producer.join(timeout=5)

    def _produce(self, entries: list[SlideEntry], streams: queue.Queue[Any], slots: threading.BoundedSemaphore) -> None:
        out_px = self.tiling.tile.patch_size
        for entry in entries:
            if self._stop.is_set():
                break
            try:
                plan: TilePlan | None = self._plan(entry)
                error: Exception | None = None
            except (SlidemilError, OSError, ValueError, RuntimeError) as exc:
                plan, error = None, exc
            stream = SlideStream(entry, plan, error, slots, self.cfg.max_tiles)
            if not self._put(streams, stream):
                break
            if plan is None:
                stream._batches.put(_END)
                continue
            coords = plan.grid.coords[:stream.n_tiles]
            sources = _SourcePool(entry, plan.grid.patch_size_level0, out_px, self.cfg.tile_source)
            futures: list[Future[np.ndarray]] = []
            for start in range(0, len(coords), self.cfg.batch_size):
                if not self._acquire(slots):
                    break
                batch = coords[start:start + self.cfg.batch_size]
                future = self._pool.submit(sources.read, batch, plan.grid.patch_size_level0, out_px)
                futures.append(future)
                stream._batches.put((start, future))
            stream._batches.put(_END)
            threading.Thread(target=_close_when_done, args=(futures, sources), daemon=True).start()
        self._put(streams, _END)

    def _acquire(self, slots: threading.BoundedSemaphore) -> bool:
        while not slots.acquire(timeout=0.2):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _put(self, streams: queue.Queue[Any], item: Any) -> bool:
        while not self._stop.is_set():
            try:
                streams.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False


def backbone_features(stream: SlideStream, runners: Sequence[Runner], dims: Sequence[int]) -> list[np.ndarray]:
    """Every runner's features of every tile of ``stream``: float32 (n_tiles, dim) per runner.

    Each runner gets the batches through ``infer_stream``, so asynchronous runners keep a batch in
    flight while the next one is handed over; an ensemble's members see each batch in turn.

    Raises:
        SlidemilError: a read error of the slide (the caller records it and drains the stream).
    """
    features = [np.empty((stream.n_tiles, dim), np.float32) for dim in dims]
    feeds = ((first, {"tiles": tiles}) for first, tiles in stream.batches())
    copies = itertools.tee(feeds, len(runners)) if len(runners) > 1 else (feeds,)
    filled = 0
    for results in zip(*(runner.infer_stream(c) for runner, c in zip(runners, copies))):
        for buf, (first, out) in zip(features, results):
            batch = out["features"]
            buf[first:first + len(batch)] = batch
        filled += len(results[0][1]["features"])
    if filled != stream.n_tiles:  # a stream stopped early must never leave rows of garbage behind
        raise SlideReadError(f"{stream.entry.slide_id}: {filled} of {stream.n_tiles} tiles arrived from the reader; "
                             "re-run to retry the slide")
    return features


def _close_when_done(futures: list[Future[np.ndarray]], sources: _SourcePool) -> None:
    wait(futures)  # errors are raised to the consumer, not here
    sources.close()
