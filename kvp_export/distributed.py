"""Where a process runs: its device, and its place among torchrun's processes.

`kvp train` and `kvp fit` run unchanged under `torchrun --nproc_per_node N`: each process
reads its rank from the environment torchrun sets, joins a process group (gloo on CPU,
NCCL on CUDA), works on its share of the data, and only rank 0 writes files.
Run as one process, nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Device, choices
from .errors import KvpError, check_choice

DEVICES = choices(Device)


def resolve_device(name: str) -> torch.device:
    """cpu, cuda (refused where there is none) or auto (cuda if present, else cpu).

    Under torchrun each process takes the GPU of its LOCAL_RANK."""
    check_choice("device", name, DEVICES)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU visible"
        raise KvpError(f"--device cuda: no CUDA device is available ({build}); pass --device auto to fall back "
                       "to the CPU")
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise KvpError(f"process {local} has no GPU of its own: {count} visible (use --nproc_per_node <= {count})")
    return torch.device("cuda", local)


@dataclass(frozen=True)
class World:
    """This process's rank among `size` (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over processes (in place)."""
        if self.distributed:
            dist.all_reduce(t)
            t /= self.size
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is true on one (decisions taken on one clock)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def launched_as_main() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block (gloo on CPU, NCCL on CUDA).

    A group that already exists (the caller made it) is used and left alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        yield current()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()
