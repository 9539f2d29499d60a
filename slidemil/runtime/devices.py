"""Several devices on one node: one worker process per device over one shared queue of slides.

``slidemil score --devices all|0,1,...|cpu:N`` (and ``extract``) starts one worker per device with
:func:`slidemil.processes.worker_context` (forkserver or spawn, never fork), each seeing only its GPU
(``CUDA_VISIBLE_DEVICES``, set in the worker before CUDA starts). The parent leaves out the slides that
are complete (and removes the temporaries a killed run left) once, then puts every slide left on a
queue; each worker claims the next slide when its pipeline is ready for one (:class:`SlideClaims`), so a
faster device takes more slides and no slide is claimed twice. Workers write into the same output
folder: per-slide files are atomic, and the results table appends its rows under a file lock.

``cpu:N`` runs N workers on the CPU (each with its share of the cores): the same scheduler, testable
without a GPU.
"""

from __future__ import annotations

import logging
import os
import queue as queues
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from slidemil.errors import ConfigError, SlidemilError
from slidemil.processes import worker_context
from slidemil.slide.table import SlideEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """One worker's device: ``device`` as the worker passes it on (``cuda`` or ``cpu``), the
    ``CUDA_VISIBLE_DEVICES`` it gets (None: left as it is), and a name for its files and log lines."""

    device: str
    visible: str | None
    name: str


def parse_devices(text: str, gpu_count: Callable[[], int] | None = None) -> list[Device]:
    """``all`` (every GPU torch sees), ``0,1,...`` (GPU indices), ``cuda:0,cuda:1`` or ``cpu:N`` (N CPU workers).

    Indices are those of this process: where ``CUDA_VISIBLE_DEVICES`` is already set (a Slurm job), index
    i is its i-th entry.

    Raises:
        ConfigError: an unknown form, a GPU index that does not exist, or no GPU for ``all``.
    """
    text = text.strip()
    if text.startswith("cpu"):
        workers = text.partition(":")[2] or "1"
        if not workers.isdigit() or int(workers) < 1:
            raise ConfigError(f"--devices {text!r}: write cpu:N with N >= 1 CPU workers")
        return [Device("cpu", None, f"cpu-{i}") for i in range(int(workers))]
    count = (gpu_count or _gpu_count)()
    if text == "all":
        if count == 0:
            raise ConfigError("--devices all: torch sees no CUDA GPU here; use --devices cpu:N for CPU workers")
        indices = list(range(count))
    else:
        try:
            indices = [int(part.strip().removeprefix("cuda:")) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"--devices {text!r}: give all, GPU indices (0,1,...) or cpu:N") from None
        if not indices or len(set(indices)) != len(indices):
            raise ConfigError(f"--devices {text!r}: give each GPU once")
        missing = [i for i in indices if not 0 <= i < count]
        if missing:
            raise ConfigError(f"--devices {text!r}: GPU {missing[0]} does not exist here (torch sees {count})")
    visible = [v.strip() for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",")] \
        if os.environ.get("CUDA_VISIBLE_DEVICES") else None
    return [Device("cuda", visible[i] if visible else str(i), f"cuda-{i}") for i in indices]


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class SlideClaims:
    """The slides a worker claims from the shared queue, one at a time, as its pipeline asks for them.

    Iterating yields ``SlideEntry`` objects until the queue's end marker for this worker; ``claimed``
    lists the ids taken. ``name`` names the worker's files (``run_summary.<name>.json``).
    """

    def __init__(self, queue: Any, name: str) -> None:
        self._queue, self.name = queue, name
        self.claimed: list[str] = []

    def __iter__(self) -> Iterator[SlideEntry]:
        while (entry := self._queue.get()) is not None:
            self.claimed.append(entry.slide_id)
            yield entry


WorkerFn = Callable[..., dict[str, Any]]  # (device, claims, *args) -> the worker's summary


def run_on_devices(work: WorkerFn, devices: Sequence[Device], entries: Sequence[SlideEntry],
                   args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Run ``work(device, claims, *args)`` in one worker process per device over a shared queue of ``entries``.

    ``work`` must be a picklable (module-level) function. Returns each worker's summary (with ``device``
    and ``claimed``, the ids of the slides it took) in the order of ``devices``.

    Raises:
        SlidemilError: a worker failed (after the others finished); the slides it claimed and did not
            finish are scored by re-running the same command.
    """
    ctx: Any = worker_context()
    queue = ctx.Queue()
    results = ctx.Queue()
    for entry in entries:
        queue.put(entry)
    for _ in devices:
        queue.put(None)  # one end marker per worker
    cores = _cpu_shares(devices)
    procs = [ctx.Process(target=_worker_main, args=(work, device, cores.get(device.name), queue, results, args),
                         name=f"slidemil-{device.name}") for device in devices]
    log.info("%d slides over %d workers: %s", len(entries), len(devices), ", ".join(d.name for d in devices))
    for proc in procs:
        proc.start()
    by_name: dict[str, dict[str, Any]] = {}
    while len(by_name) < len(procs):
        try:
            name, summary = results.get(timeout=1.0)
            by_name[name] = summary
        except queues.Empty:  # a worker that died without a word is found by its exit code
            dead = [p for p in procs if p.exitcode is not None and p.name.removeprefix("slidemil-") not in by_name]
            for proc in dead:
                by_name[proc.name.removeprefix("slidemil-")] = {"error": f"exited with code {proc.exitcode}"}
    for proc in procs:
        proc.join()
    summaries = [{**by_name[d.name], "device": d.name} for d in devices]
    failed = [s for s in summaries if "error" in s]
    if failed:
        raise SlidemilError("worker " + "; worker ".join(f"{s['device']} failed: {s['error']}" for s in failed)
                            + ". Run the same command again to finish the slides it left")
    return summaries


def _cpu_shares(devices: Sequence[Device]) -> dict[str, list[int]]:
    """The cores of this process dealt out to its CPU workers (each a disjoint share); GPU workers keep all."""
    cpu = [d for d in devices if d.device == "cpu"]
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return {}
    if len(cpu) > len(cores):
        raise ConfigError(f"--devices cpu:{len(cpu)}: more CPU workers than the {len(cores)} cores given")
    return {d.name: cores[i::len(cpu)] for i, d in enumerate(cpu)}


def _worker_main(work: WorkerFn, device: Device, cores: list[int] | None, queue: Any, results: Any,
                 args: tuple[Any, ...]) -> None:
    """A worker process: its GPU alone visible (set before anything starts CUDA), or its share of the
    cores (runners take their thread count from the affinity mask), then ``work``."""
    threads = None
    if device.visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device.visible
    if cores:
        os.sched_setaffinity(0, cores)
        os.environ.pop("SLURM_CPUS_PER_TASK", None)  # the share, not the job's allocation, is this worker's
        threads = len(cores)
        import torch
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{device.name}] %(levelname)s %(name)s: %(message)s")
    claims = SlideClaims(queue, device.name)
    start = time.perf_counter()
    try:
        summary = work(device.device, threads, claims, *args)
    except BaseException as exc:  # reported to the parent, which names the worker
        log.error("worker %s failed: %s", device.name, "".join(traceback.format_exception(exc))[-2000:])
        results.put((device.name, {"error": f"{type(exc).__name__}: {exc}", "claimed": claims.claimed}))
        raise SystemExit(1) from None
    results.put((device.name, {**summary, "claimed": claims.claimed,
                               "worker_seconds": round(time.perf_counter() - start, 3)}))


def peak_gpu_mb() -> float | None:
    """Peak GPU memory torch allocated in this process, in MB (None where CUDA was never used)."""
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20, 1)


__all__ = ["Device", "SlideClaims", "parse_devices", "peak_gpu_mb", "run_on_devices"]
