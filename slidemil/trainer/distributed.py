"""Data-parallel training: the process group as a context manager, rank helpers, gathering.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`process_group` then joins the group
(gloo on CPU, nccl on CUDA), pins the rank's GPU and silences logging and progress bars on every
rank but 0. Without those variables it is a no-op single process, so the same code runs both ways.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slidemil.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of ranks, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but CUDA is not available; use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join the torchrun process group (if any) for the duration of the block.

    Yields:
        The :class:`DistContext` of this process.
    """
    rank, world, local_rank = env_world()
    dev = resolve_device(device, local_rank)
    if world == 1 or dist.is_initialized():
        yield DistContext(rank if dist.is_initialized() else 0, world if dist.is_initialized() else 1,
                          local_rank, dev)
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    quiet = logging.getLogger("slidemil")
    old_level = quiet.level
    if rank != 0:
        quiet.setLevel(logging.WARNING)
    log.info("process group: %s, %d ranks", backend, world)
    try:
        yield DistContext(rank, world, local_rank, dev)
    finally:
        quiet.setLevel(old_level)
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def shard(n: int, ctx: DistContext) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``n`` items: each item on exactly one rank."""
    return list(range(ctx.rank, n, ctx.world_size))


def wrap_ddp(model: nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """DDP without buffer syncing in forward (evaluation runs uneven shards on the plain module)."""
    no_sync: dict[str, Any] = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, **no_sync)


def average_batchnorm_statistics(model: nn.Module, ctx: DistContext) -> None:
    """Average the running statistics of BatchNorm layers in training mode over ranks.

    Each rank's statistics follow its own bags; averaging them after an epoch gives every rank the
    same model to evaluate and save (layers in eval mode, e.g. frozen ones, have not moved).
    """
    if not ctx.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for stat in (module.running_mean, module.running_var):
                if stat is not None:
                    dist.all_reduce(stat)
                    stat.div_(ctx.world_size)
