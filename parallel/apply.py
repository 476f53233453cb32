"""Turn a meta-device GPT into this rank's trained module under a ``ParallelDims`` layout.

Order (torchtitan's): on the meta device, prune to this rank's pipeline stages -> tensor parallel
(DTensor) -> activation-checkpoint wrappers -> FSDP2 sharding; then materialise (``to_empty``) and
initialise only the values this rank holds; then wrap DDP replicas. Each rank fills its shard with the
region of the full parameter it holds, drawn from the (seed, parameter name, row block) generators of
``gptforge.model.gpt`` exactly as a single process draws the whole parameter (``init_slice_``), so a
model has the same weights under every layout, which the equivalence tests rely on, and no rank ever
holds a full parameter it does not keep (the largest temporary is one row block of it, besides the
list of row indices DTensor builds to locate a shard).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..model.gpt import GPT, init_slice_, init_tensor_
from .dims import ParallelDims
from .pipeline import PipelineRanks, PipelineRunner, prune_to_rank
from .rng import ModelParallelRNG, set_model_parallel_rng
from .tensor_parallel import apply_tensor_parallel, use_model_parallel_rng


def clean_name(name: str) -> str:
    """The parameter's name in the plain model: without the activation-checkpoint wrapper's prefix (as
    torch's state-dict helpers strip it), so initialisation and checkpoints see the same names."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def local_region(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offsets) of the region of the full parameter this rank holds. A DTensor sharded twice
    along one dimension (FSDP2 over a tensor-parallel shard: _StridedShard on "dp", Shard on "tp")
    holds one contiguous row range of it, the dp-th chunk of the tp-th chunk, which
    ``compute_local_shape_and_global_offset`` gives too; a plain tensor is the whole parameter."""
    if not isinstance(param, DTensor):
        return tuple(param.shape), (0,) * param.dim()
    shape, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offsets)


@torch.no_grad()
def init_local_shard_(model: GPT, name: str, param: torch.Tensor, seed: int) -> None:
    """Fill this rank's values of parameter ``name`` (possibly wrapper-prefixed) by its init rule."""
    name = clean_name(name)
    rule = model.init_rule(name)
    if not isinstance(param, DTensor):
        init_tensor_(param, rule, seed, name)
        return
    local = param.to_local()  # outside autograd: the shard itself (FSDP2's view into its padded storage)
    shape, offsets = local_region(param)
    if tuple(local.shape) != shape:
        raise AssertionError(f"{name}: local shard {tuple(local.shape)} but its placements "
                             f"{param.placements} give {shape}")
    init_slice_(local, rule, seed, name, param.shape, offsets)


@torch.no_grad()
def init_local_shards(model: GPT, seed: int) -> None:
    """Initialise every parameter's local shard after ``to_empty``. The GPT has no buffers; one added
    later would hold uninitialised memory here, so it is an error until it gets an initialiser."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise RuntimeError(f"buffers {buffers} have no initialiser after to_empty (parallel/apply.py)")
    for name, param in model.named_parameters():
        init_local_shard_(model, name, param, seed)


def apply_recompute(model: GPT, dims: ParallelDims, rng: ModelParallelRNG | None = None) -> None:
    """Wrap blocks in activation checkpointing. The wrapper puts ``_checkpoint_wrapped_module.`` into
    parameter names; initialisation (``clean_name``) and checkpoints strip it again, so neither depends
    on it. A recomputed block redraws its forward's dropout masks: checkpointing restores the default
    generator, and ``rng`` (when dropout uses one) restores the model-parallel one."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import noop_context_fn

    context_fn = rng.checkpoint_contexts if rng is not None else noop_context_fn
    for i, name in enumerate(list(model.blocks)):
        if dims.recompute == "full" or (dims.recompute == "selective" and i % dims.recompute_every == 0):
            model.blocks[name] = checkpoint_wrapper(model.blocks[name], preserve_rng_state=True,
                                                    context_fn=context_fn)


def mixed_precision_policy(precision: str):
    """FSDP2 mixed precision: 16-bit parameters and compute, fp32 sharded master weights, fp32
    gradient reduction (so the average over data-parallel ranks loses nothing)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_compile(model: GPT) -> None:
    """``torch.compile`` each block in place (``Module.compile``: names and state dicts unchanged), after
    tensor parallelism and recompute wrap it and before FSDP shards it, as torchtitan orders them; one
    graph per block (``fullgraph``), so a graph break is an error, not a silent slow path."""
    for block in model.blocks.values():
        block.compile(fullgraph=True)


def parallelize(model: GPT, dims: ParallelDims, mesh, device: torch.device, seed: int,
                precision: str = "fp32", compile: bool = False) -> tuple[nn.Module, PipelineRunner | None]:
    """``model`` is on the meta device and is changed in place (pruned to this rank's pipeline stages,
    sharded, materialised on ``device``, initialised). Returns the module to call for a forward (the
    model or a DDP wrapper) and, with pp > 1, the pipeline runner. Under FSDP ``precision`` becomes its
    mixed-precision policy; otherwise the training loop autocasts over fp32 weights. ``compile``: each
    block compiled (``apply_compile``)."""
    pipeline_ranks = None
    if dims.pp > 1:
        pipeline_ranks = PipelineRanks.from_mesh(mesh, dims)
        prune_to_rank(model, dims, pipeline_ranks.pp_rank)
    rng = None
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=dims.sequence_parallel,
                              loss_parallel=dims.loss_parallel)
        if model.config.dropout > 0:
            pp_rank = pipeline_ranks.pp_rank if pipeline_ranks is not None else 0
            rng = ModelParallelRNG(seed=seed, tp_rank=mesh["tp"].get_local_rank(), pp_rank=pp_rank, device=device)
            use_model_parallel_rng(model, rng, sequence_parallel=dims.sequence_parallel)
    set_model_parallel_rng(rng)
    if dims.recompute != "none":
        apply_recompute(model, dims, rng)
    if compile:
        apply_compile(model)
    runner = None
    if pipeline_ranks is not None:  # replicas: the runner averages gradients after each schedule
        runner = PipelineRunner(model, dims, pipeline_ranks, device, dims.pp_schedule)
        if dims.fsdp:
            runner.shard(mesh["dp"], dims.zero_stage == 3, mixed_precision_policy(precision), dims.fsdp_unit)
    elif dims.fsdp:
        shard_model(model, mesh["dp"], dims.zero_stage == 3, mixed_precision_policy(precision), dims.fsdp_unit)
    model.to_empty(device=device)
    init_local_shards(model, seed)
    if runner is not None:
        runner.overlap_grad_reduce(mesh["dp"].get_group())
    if runner is not None or dims.deepspeed or dims.fsdp:
        # DeepSpeed: the engine wraps the model once the optimizer exists (training/trainer.py)
        return model, runner
    if dims.dp > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh["dp"].get_group()), None
    return model, None


def shard_block(block: nn.Module, unit: str, **fsdp_kwargs) -> None:
    """FSDP2 units of one block (``parallel.fsdp_unit``): the block, after each of its linear layers
    with ``linear`` (bottom-up, so the block's unit keeps only what is left: its LayerNorms)."""
    from torch.distributed.fsdp import fully_shard

    if unit == "linear":
        for module in block.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, **fsdp_kwargs)
    fully_shard(block, **fsdp_kwargs)


def shard_position_embedding(embedding: nn.Module | None, unit: str, **fsdp_kwargs) -> None:
    """With ``fsdp_unit: linear`` the position embedding is a unit too, gathered only at the two ends of
    the step; otherwise it stays in the root unit. (The token embedding always stays in the root: the tied
    output projection reads its weight outside the embedding's own forward.)"""
    from torch.distributed.fsdp import fully_shard

    if unit == "linear" and embedding is not None:
        fully_shard(embedding, **fsdp_kwargs)


def shard_model(model: GPT, dp_mesh, reshard_after_forward: bool, mp_policy, unit: str = "block") -> None:
    """FSDP2 over the data-parallel ranks: each block (or each of its linear layers and the position
    embedding, ``unit``) one unit, the root the rest (embeddings, final LayerNorm).
    ``reshard_after_forward``: ZeRO-3 frees gathered parameters after forward, ZeRO-2 keeps them."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy}
    for block in model.blocks.values():
        shard_block(block, unit, **kwargs)
    shard_position_embedding(model.pos_embeddings, unit, **kwargs)
    fully_shard(model, **kwargs)


def no_grad_sync(module: nn.Module, dims: ParallelDims):
    """Context for the backward of every micro-batch of a step but the last.

    FSDP (default): nothing changes, every backward reduce-scatters its gradients, which accumulate
    sharded, so a rank holds 1/dp of the model's gradients between micro-batches (one more collective
    per micro-batch). With ``defer_grad_reduce``: reduction waits for the last micro-batch, and until
    then every rank accumulates the unsharded gradients of the whole model. DDP: ``no_sync``, since
    its gradients are whole on every rank anyway, deferring the all-reduce costs no memory."""
    import contextlib

    if dims.fsdp:
        if not dims.defer_grad_reduce:
            return contextlib.nullcontext()

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
