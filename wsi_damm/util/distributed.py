"""Data-parallel set-up shared by `train` and `predict`: the process group, the DDP wrapper,
gradient averaging and the cross-rank weight checksum.

One process unless `torchrun` set WORLD_SIZE / RANK / LOCAL_RANK: then gloo on CPU, nccl on
CUDA. Rank 0 writes outputs; every rank computes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wsi_damm.util.devices import resolve_device


@dataclass
class Ranks:
    """Where this process sits: its rank, how many there are, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.world > 1:
            dist.barrier()

    def wait_until(self, ready: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Wait, without any collective, until `ready()` holds: while rank 0 alone does work of unbounded
        length (tiling a slide), the others must not sit in a barrier that the process-group timeout
        would end. If rank 0 fails, torchrun stops every rank."""
        while not ready():
            time.sleep(poll_s)


def setup_ranks(device_name: str, timeout_min: float = 30.0) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process. `timeout_min`: how long
    a rank may wait in a collective (gloo / nccl) before the run fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Ranks(dist.get_rank(), world, device)
    return Ranks(0, 1, resolve_device(device_name))


def data_parallel(module: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """DDP over the ranks (the module itself in a single process)."""
    if ranks.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # the confidence head gets no gradient during warm-up, hence find_unused_parameters
    return DistributedDataParallel(
        module, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None, find_unused_parameters=True
    )


def average_gradients(module: torch.nn.Module, ranks: Ranks) -> None:
    """Data-parallel small models (the autoencoders): average gradients over ranks, no bucketing."""
    if ranks.world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= ranks.world


def parameter_checksums(model: torch.nn.Module, ranks: Ranks) -> list[float]:
    """Every rank's parameter sum: all ranks must hold the same weights."""
    local = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(ranks.world)]
    dist.all_gather(gathered, local)
    return [float(x) for x in gathered]
