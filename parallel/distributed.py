"""Process-group set-up and the few collectives the training loop needs.

Under ``torchrun`` (or ``srun torchrun``) the rank and world size come from the environment; a plain
``gptforge train`` runs as a one-rank group on an in-memory store, so the same code path (collectives,
distributed checkpoints) serves both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


def nvidia_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (its ``GPU i: NAME (UUID: ...)`` lines); empty without the tool."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def resolve_device_kind(device_kind: str) -> str:
    """``cuda`` or ``cpu`` for ``train.device``; UserError where CUDA is asked for, or GPUs are present,
    but this torch cannot use them (``auto`` would otherwise train on the CPU while the GPUs idle)."""
    if torch.cuda.is_available():
        return "cpu" if device_kind == "cpu" else "cuda"
    if device_kind == "cpu":
        return "cpu"
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        why = (f"this {build} is a CPU build; install the CUDA build (GPTFORGE_TORCH=cuda bash launcher/install.sh, "
               f"README 'GPU cluster')")
    else:
        why = (f"this {build} (CUDA {torch.version.cuda}) finds no usable GPU: check the driver (nvidia-smi) "
               f"and CUDA_VISIBLE_DEVICES")
    if device_kind == "cuda":
        raise UserError(f"train.device is 'cuda' but no CUDA device is available: {why}")
    gpus = nvidia_gpus()
    if gpus:
        raise UserError(f"train.device is 'auto' and nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}), but {why}; "
                        f"or set train.device=cpu to train on the CPU on purpose")
    return "cpu"


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Start the default process group (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    use_cuda = resolve_device_kind(device_kind) == "cuda"
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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place across the ranks of ``group`` (default: all) and return it. On a device
    tensor this queues the collective and returns without waiting for the GPU: nothing is read back."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


class LaggedSum:
    """A sum over all ranks that never holds up a step: ``post(values)`` starts the all-reduce of this
    step's values and returns the sums posted at the previous call, by then long done. It runs on a gloo
    group of its own, on host memory, so it neither synchronises the GPU nor queues behind the training
    collectives. Every rank posts at every step and so reads the same sums at the same step: a decision
    taken on them (stop, commit a checkpoint) is one step late but the same everywhere.

    Creating one is collective (its process group)."""

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._tensor: torch.Tensor | None = None
        self._work = None

    def post(self, values: list[float]) -> list[float] | None:
        """Start the sum of ``values``; returns the previous post's sums (None at the first post)."""
        previous = self.collect()
        self._tensor = torch.tensor(values, dtype=torch.float64)
        if self._group is not None:
            self._work = dist.all_reduce(self._tensor, group=self._group, async_op=True)
        return previous

    def collect(self) -> list[float] | None:
        """Wait for the sums in flight, if any, and return them (None when nothing was posted)."""
        if self._tensor is None:
            return None
        if self._work is not None:
            self._work.wait()
        out, self._tensor, self._work = self._tensor.tolist(), None, None
        return out
