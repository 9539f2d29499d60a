"""The tile pipeline: slides -> tissue and grid -> uint8 tile batches, read ahead by worker threads.

One producer thread walks the slides: it plans each slide's tiles (``plan_tiles``), then hands
batches of coords to a pool of reader threads, each holding its own tile source (file handle) for
the slide. Futures go into a bounded queue in tile order, so memory is bounded by
``queue_batches + workers`` batches whatever the slide size, and reading of the next slide starts
while the consumer is still running the model on the current one. The consumer (feature
extraction, scoring) iterates over ``SlideStream`` objects and their batches in order.

Feature extraction and scoring both run this pipeline; neither has a private copy of it. With
``decode_device`` (the planner's ``ExecutionPlan.decode_on_device``), reader threads only fetch the
compressed tiles and one decode thread decodes each batch on the device; ``batches()`` then yields
uint8 torch tensors on that device (see :mod:`slidemil.runtime.device_pipeline`). Slides are planned
(tissue and grid) two at a time ahead of the one being read, so that short slides do not leave the
model waiting for the planner.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.choices import DecodeMode, TileSourceKind
from slidemil.errors import SlidemilError, SlideReadError
from slidemil.runtime.device_pipeline import DecodeState, DeviceDecoder, fetch
from slidemil.runtime.runners import Runner
from slidemil.slide.readers import open_slide
from slidemil.slide.sources import TileSource, open_tile_source
from slidemil.slide.table import SlideEntry
from slidemil.slide.tiling import TilePlan, TilingConfig, plan_tiles

log = logging.getLogger(__name__)

_END = object()
DEFAULT_BATCH = 32  # tiles per batch when neither the user nor the planner chose
PLAN_AHEAD = 2  # slides planned (tissue, grid) in parallel ahead of the one being read


@dataclass(frozen=True)
class PipelineConfig:
    """Reading settings: tiles per batch, reader threads, read-ahead depth, tile source, where tiles are decoded.

    ``batch_size`` None leaves it to the planner (``ExecutionPlan.batch_size``: 32 on a CPU, from the
    GPU's free memory and the model on a GPU). ``decode``: ``auto`` decodes JPEG tiles on the GPU where
    the model runs on one, ``cpu`` always on the CPU, ``device`` on the model's device even on a CPU
    (the device stages run there; for tests and comparisons). ``device_batches``: decoded batches held
    on the device ahead of the model.
    """

    batch_size: int | None = None
    workers: int = 2
    queue_batches: int = 6
    tile_source: TileSourceKind = "auto"
    max_tiles: int | None = None
    decode: DecodeMode = "auto"
    device_batches: int = 3


class _SourcePool:
    """One tile source per reader thread for one slide; closed when the slide is done."""

    def __init__(self, entry: SlideEntry, size_level0: int, out_px: int, kind: str,
                 decode: DecodeState | None = None, pin: bool = False) -> None:
        self._args = (entry.path, entry.mpp, size_level0, out_px, kind)
        self._local = threading.local()
        self._all: list[TileSource] = []
        self._lock = threading.Lock()
        self._decode, self._pin = decode, pin

    def _source(self) -> TileSource:
        source = getattr(self._local, "source", None)
        if source is None:
            source = open_tile_source(*self._args)
            self._local.source = source
            with self._lock:
                self._all.append(source)
        return source

    def read(self, coords: np.ndarray, size_level0: int, out_px: int) -> Any:
        """The batch's pixels (CPU decoding), or with a decode state what the device stage takes."""
        if self._decode is not None:
            return fetch(self._source(), Path(self._args[0]), coords, size_level0, out_px, self._decode, self._pin)
        return self._source().read(coords, size_level0, out_px)

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
                 slots: threading.BoundedSemaphore, max_tiles: int | None = None,
                 device_slots: threading.BoundedSemaphore | None = None) -> None:
        self.entry = entry
        self.plan = plan
        self.error = error
        n = 0 if plan is None else len(plan.grid)
        self.n_tiles = min(n, max_tiles) if max_tiles else n  # fixed before the consumer sees the stream
        self._batches: queue.Queue[Any] = queue.Queue()  # (start, future) from the producer
        self._slots = slots
        self._ended = False
        # With a decode stage: (start, device tensor or exception) from the decode thread.
        self._device_slots = device_slots
        self._decoded: queue.Queue[Any] | None = queue.Queue() if device_slots is not None else None
        self._raw_ended = False
        self.abandoned = False  # the consumer gave up on the slide: the decode stage skips its batches

    def _next_raw(self, stop: threading.Event | None = None) -> tuple[int, Future[Any]] | None:
        if self._raw_ended:
            return None
        while True:
            try:
                item = self._batches.get(timeout=0.2)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
        if item is _END:
            self._raw_ended = True
            return None
        self._slots.release()
        return item

    def _next(self) -> tuple[int, Any] | None:
        if self._decoded is None:
            return self._next_raw()
        if self._ended:
            return None
        item = self._decoded.get()
        if item is _END:
            self._ended = True
            return None
        assert self._device_slots is not None
        self._device_slots.release()
        return item

    def batches(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(first_tile_index, uint8 (B, H, W, 3))`` in tile order: numpy arrays, or torch tensors
        on the decode device when the pipeline decodes there.

        Raises:
            SlidemilError: a read error of this slide (the caller records it, drains, and goes on).
        """
        while (item := self._next()) is not None:
            start, value = item
            if isinstance(value, Future):
                value = value.result()
            elif isinstance(value, BaseException):
                raise value
            yield start, value

    def drain(self) -> None:
        """Discard the batches not taken (after an error), freeing their read-ahead slots."""
        self.abandoned = True
        while (item := self._next()) is not None:
            if isinstance(item[1], Future):
                item[1].cancel()


class TilePipeline:
    """Iterate over slides with their tiles read ahead by a thread pool.

    Args:
        cfg: reading settings.
        tiling: tissue and grid settings (the model package's, or the tile command's).
        plan: optional replacement of ``plan_tiles`` (e.g. coords loaded from an h5 file).
        decode_device: decode tiles on this device ("cuda", "cuda:N", or "cpu" for the same stages on
            the CPU): the planner's ``ExecutionPlan.decode_on_device``; None decodes in the reader threads.
    """

    def __init__(self, cfg: PipelineConfig, tiling: TilingConfig,
                 plan: Callable[[SlideEntry], TilePlan] | None = None, decode_device: str | None = None) -> None:
        self.cfg = cfg
        self.tiling = tiling
        self.batch_size = cfg.batch_size or DEFAULT_BATCH
        self.decode_device = decode_device
        self._plan = plan or self._plan_from_slide
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="tile-reader")
        self._planner = ThreadPoolExecutor(max_workers=PLAN_AHEAD, thread_name_prefix="tile-planner")
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
        self._planner.shutdown(wait=True, cancel_futures=True)

    def run(self, entries: Iterable[SlideEntry]) -> Iterator[SlideStream]:
        """Yield a ``SlideStream`` per slide, in order; reading runs ahead in the background.

        ``entries`` may be a lazy iterable (slides claimed from a queue shared by several workers): it is
        consumed on the producer thread, a few slides ahead of the consumer.
        """
        self._stop = threading.Event()
        streams: queue.Queue[Any] = queue.Queue(maxsize=2)
        slots = threading.BoundedSemaphore(max(1, self.cfg.queue_batches))
        self._decode_state = DecodeState()  # shared by the readers and the decode thread of this run
        threads = [threading.Thread(target=self._produce, args=(entries, streams, slots), daemon=True,
                                    name="tile-producer")]
        if self.decode_device is not None:
            device_slots = threading.BoundedSemaphore(max(1, self.cfg.device_batches))
            to_decode: queue.Queue[Any] = queue.Queue()
            self._streams_out: Callable[[SlideStream], None] = to_decode.put
            self._new_stream: Callable[..., SlideStream] = functools.partial(SlideStream, device_slots=device_slots)
            threads.append(threading.Thread(target=self._decode_loop, args=(to_decode, device_slots), daemon=True,
                                            name="tile-decoder"))
        else:
            self._streams_out = lambda stream: None
            self._new_stream = SlideStream
        for thread in threads:
            thread.start()
        try:
            while True:
                stream = streams.get()
                if stream is _END:
                    break
                yield stream
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=5)

    def _plan_guarded(self, entry: SlideEntry) -> tuple[TilePlan | None, Exception | None]:
        try:
            return self._plan(entry), None
        except (SlidemilError, OSError, ValueError, RuntimeError) as exc:
            return None, exc

    def _planned(self, entries: Iterable[SlideEntry]) -> Iterator[tuple[SlideEntry, Future[Any]]]:
        """Each slide with its planning future, ``PLAN_AHEAD`` slides planned at once, in order."""
        window: deque[tuple[SlideEntry, Future[Any]]] = deque()
        it = iter(entries)
        while True:
            while len(window) < PLAN_AHEAD and not self._stop.is_set():
                entry = next(it, None)
                if entry is None:
                    break
                window.append((entry, self._planner.submit(self._plan_guarded, entry)))
            if not window:
                return
            yield window.popleft()

    def _produce(self, entries: Iterable[SlideEntry], streams: queue.Queue[Any],
                 slots: threading.BoundedSemaphore) -> None:
        out_px = self.tiling.tile.patch_size
        decode = self._decode_state if self.decode_device is not None else None
        pin = self.decode_device is not None and self.decode_device.startswith("cuda")
        for entry, planning in self._planned(entries):
            if self._stop.is_set():
                break
            plan, error = planning.result()
            stream = self._new_stream(entry, plan, error, slots, self.cfg.max_tiles)
            self._streams_out(stream)
            if not self._put(streams, stream):
                break
            if plan is None:
                stream._batches.put(_END)
                continue
            coords = plan.grid.coords[:stream.n_tiles]
            sources = _SourcePool(entry, plan.grid.patch_size_level0, out_px, self.cfg.tile_source, decode, pin)
            futures: list[Future[Any]] = []
            for start in range(0, len(coords), self.batch_size):
                if not self._acquire(slots):
                    break
                batch = coords[start:start + self.batch_size]
                future = self._pool.submit(sources.read, batch, plan.grid.patch_size_level0, out_px)
                futures.append(future)
                stream._batches.put((start, future))
            stream._batches.put(_END)
            threading.Thread(target=_close_when_done, args=(futures, sources), daemon=True).start()
        self._streams_out(_END)  # type: ignore[arg-type]
        self._put(streams, _END)

    def _decode_loop(self, to_decode: queue.Queue[Any], device_slots: threading.BoundedSemaphore) -> None:
        """The decode thread: each stream's batches, in order, decoded on the device (``DeviceDecoder``)."""
        assert self.decode_device is not None
        decoder = DeviceDecoder(self.decode_device, self._decode_state)
        while not self._stop.is_set():
            try:
                stream = to_decode.get(timeout=0.2)
            except queue.Empty:
                continue
            if stream is _END:
                return
            failed = False
            while (item := stream._next_raw(self._stop)) is not None:
                start, future = item
                if failed or stream.abandoned:
                    future.cancel()
                    continue
                try:
                    value: Any = decoder(future.result())
                except Exception as exc:  # read or decode error: the consumer raises it for this slide
                    value, failed = exc, True
                if not self._acquire(device_slots):
                    return
                assert stream._decoded is not None
                stream._decoded.put((start, value))
            assert stream._decoded is not None
            stream._decoded.put(_END)

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


def _close_when_done(futures: list[Future[Any]], sources: _SourcePool) -> None:
    wait(futures)  # errors are raised to the consumer, not here
    sources.close()
