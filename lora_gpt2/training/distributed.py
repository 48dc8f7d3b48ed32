"""Data parallelism through torchrun + PyTorch DDP: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..devices import pick_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_choice: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0, pick_device(device_choice))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def teardown(d: Dist, clean: bool = True) -> None:
    if d.enabled and dist.is_initialized():
        if clean:
            dist.barrier()  # rank 0 may still be writing files; leave together
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_choice: str) -> Iterator[Dist]:
    """Join the process group for the block and leave it on every exit: success, error or signal.

    After an error the other ranks may never reach a barrier, so only a clean exit waits for them.
    """
    d = setup(device_choice)
    clean = False
    try:
        yield d
        clean = True
    finally:
        teardown(d, clean)


def any_rank(d: Dist, flag: bool) -> bool:
    """True if `flag` is true on any rank (so every rank stops at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_all(d: Dist, value: float) -> float:
    """The mean of `value` over ranks (a NaN or inf on any rank makes it non-finite everywhere)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
