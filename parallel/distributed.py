"""Process-group set-up and the few collectives the training loop needs.

Under ``torchrun`` (or ``srun torchrun``) the rank and world size come from the environment; a plain
``gptforge train`` runs as a one-rank group on an in-memory store, so the same code path (collectives,
distributed checkpoints) serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..common.errors import UserError


@dataclass(kw_only=True, frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Start the default process group (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:
            if world_size != 1:
                raise UserError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)



def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum floats across the ranks of ``group`` (default: all), one collective for the list."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
