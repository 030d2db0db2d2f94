"""Data-parallel set-up shared by `train` and `predict`: the process group, the DDP wrapper,
gradient averaging and the cross-rank weight checksum.

One process unless `torchrun` set WORLD_SIZE / RANK / LOCAL_RANK: then gloo on CPU, nccl on
CUDA. Rank 0 writes outputs; every rank computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


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


def setup_ranks(device_name: str) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda was requested but no CUDA device is available")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return Ranks(dist.get_rank(), world, device)
    return Ranks(0, 1, torch.device("cuda") if cuda else torch.device("cpu"))


def data_parallel(module: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """DDP over the ranks (the module itself in a single process)."""
    if ranks.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # the confidence head gets no gradient during warm-up, hence find_unused_parameters
    return DistributedDataParallel(module, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
                                   find_unused_parameters=True)


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
