"""ZeRO stages 1, 2 and 3 (with optional optimizer CPU offload) through the DeepSpeed engine.

Data parallelism only (tp = pp = 1): the engine owns gradient reduction, partitioning, clipping and
the optimizer step. The step's number of micro-batches follows GPT-3's batch ramp through
``set_train_batch_size``; losses arrive already divided by the global token count, so the engine's own
1/accumulation scaling is off. Checkpoints are in DeepSpeed's partitioned format: a DeepSpeed run
resumes under DeepSpeed with the same data-parallel size.
"""

from __future__ import annotations

import os

import torch

from gptforge.parallel.dims import ParallelDims


def deepspeed_config(*, dims: ParallelDims, micro_batch: int, global_batch: int, precision: str,
                     grad_clip: float) -> dict:
    zero: dict = {"stage": dims.zero_stage}
    if dims.optimizer_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * dims.dp),
        "train_batch_size": global_batch,
        "zero_optimization": zero,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our torch AdamW (GPT-3's betas, decoupled decay groups) is the client optimizer, also when offloaded.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap ``model`` (initialised, on its device) and ``optimizer`` in a DeepSpeed engine."""
    import deepspeed

    # The process group already exists (gloo or NCCL); DeepSpeed reuses it.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False,
                               dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_batch(engine, batch: int) -> None:
    """Sequences in the next step (the batch ramp changes the accumulation count)."""
    if engine.train_batch_size() != batch:
        engine.set_train_batch_size(batch)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


DS_TAG = "deepspeed"


def save(engine, directory: str) -> None:
    engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False)


def load(engine, directory: str) -> None:
    if not os.path.isdir(os.path.join(directory, DS_TAG)):
        raise ValueError(f"checkpoint {directory!r} was not written by the DeepSpeed engine; resume it under the "
                         f"layout that wrote it (parallel.zero_engine)")
    path, _ = engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"DeepSpeed could not load {directory!r} (was it written with another data-parallel size?)")
