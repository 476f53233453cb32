"""Turn a meta-device GPT into this rank's trained module under a ``ParallelDims`` layout.

Order: tensor parallel on the meta model -> materialise (``to_empty``) -> initialise -> data parallel
(DDP replicas, or FSDP2 sharding for ZeRO-2/3). Every parameter is initialised from its full value,
generated from (seed, parameter name) exactly as a single process would, and this rank keeps its shard:
so a model has the same weights under every layout, which the equivalence tests rely on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model.gpt import GPT, init_tensor_
from .dims import ParallelDims
from .pipeline import PipelineRanks, PipelineRunner, prune_to_rank
from .tensor_parallel import apply_tensor_parallel


@torch.no_grad()
def init_parameters(model: GPT, seed: int) -> None:
    for name, param in model.named_parameters():
        rule = model.init_rule(name)
        if isinstance(param, DTensor):
            full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
            init_tensor_(full, rule, seed, name)
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            init_tensor_(param, rule, seed, name)


def apply_recompute(model: GPT, dims: ParallelDims) -> None:
    """Wrap blocks in activation checkpointing (after init: the wrapper changes parameter names,
    which checkpoints strip again, so saved files are the same with or without it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, name in enumerate(list(model.blocks)):
        if dims.recompute == "full" or (dims.recompute == "selective" and i % dims.recompute_every == 0):
            model.blocks[name] = checkpoint_wrapper(model.blocks[name], preserve_rng_state=True)


def mixed_precision_policy(precision: str):
    """FSDP2 mixed precision: 16-bit parameters and compute, fp32 sharded master weights, fp32
    gradient reduction (so the average over data-parallel ranks loses nothing)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def parallelize(model: GPT, dims: ParallelDims, mesh, device: torch.device, seed: int,
                precision: str = "fp32") -> tuple[nn.Module, PipelineRunner | None]:
    """``model`` is on the meta device and is changed in place (pruned to this rank's pipeline stages,
    sharded). Returns the module to call for a forward (the model or a DDP wrapper) and, with pp > 1,
    the pipeline runner. Under FSDP ``precision`` becomes its mixed-precision policy; otherwise the
    training loop autocasts over fp32 weights."""
    pipeline_ranks = None
    if dims.pp > 1:
        pipeline_ranks = PipelineRanks.from_mesh(mesh, dims)
        prune_to_rank(model, dims, pipeline_ranks.pp_rank)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=dims.sequence_parallel,
                              loss_parallel=dims.loss_parallel)
    model.to_empty(device=device)
    init_parameters(model, seed)
    if dims.recompute != "none":
        apply_recompute(model, dims)
    if pipeline_ranks is not None:  # replicas: the runner averages gradients after each schedule
        runner = PipelineRunner(model, dims, pipeline_ranks, device, dims.pp_schedule)
        if dims.fsdp:
            runner.shard(mesh["dp"], dims.zero_stage == 3, mixed_precision_policy(precision))
        return model, runner
    if dims.deepspeed:  # the engine wraps the model once the optimizer exists (training/trainer.py)
        return model, None
    if dims.fsdp:
        from torch.distributed.fsdp import fully_shard

        reshard = dims.zero_stage == 3  # ZeRO-3: free gathered parameters after forward; ZeRO-2: keep them
        policy = mixed_precision_policy(precision)
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, mesh=mesh["dp"], reshard_after_forward=reshard, mp_policy=policy)
        return model, None
    if dims.dp > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh["dp"].get_group()), None
    return model, None


def no_grad_sync(module: nn.Module, dims: ParallelDims):
    """Context in which backward accumulates gradients locally (all micro-batches but the last)."""
    import contextlib

    if dims.fsdp:
        @contextlib.contextmanager
        def fsdp_no_sync():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    if dims.dp > 1:
        return module.no_sync()
    return contextlib.nullcontext()
