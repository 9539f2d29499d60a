"""How slidemil starts worker processes: never by a bare fork of a process that has run threads.

By the time a DataLoader or a process pool starts its workers, the process may have run OpenVINO,
ONNX Runtime, NNCF, Inductor or OpenMP thread pools. ``fork`` copies such a process with its locks in
whatever state other threads left them, and the child can deadlock or crash later (a segfault far
from its cause). Workers are therefore started by ``forkserver`` (forked from a clean, single-threaded
server process) where the platform has it, else by ``spawn``. The objects sent to workers (datasets,
per-slide functions) must be picklable; slide readers pickle by path.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

SAFE_METHODS = ("forkserver", "spawn")


def worker_context() -> BaseContext:
    """The multiprocessing context for every worker process slidemil starts."""
    available = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context(next(m for m in SAFE_METHODS if m in available))
