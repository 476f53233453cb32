"""The ``parallel`` section of a training config: how the ranks of a job split the work.

``ParallelDims`` (dims.py) is the same layout resolved for a world size (``dp`` inferred) and checked;
it is also what the memory planner (planner.py) and ``gptforge plan`` describe a layout with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """How the ranks of a job split the work (see parallel/dims.py); tp x pp x dp must equal the world size."""

    tp: int = 1
    """Tensor-parallel degree: heads, FFN and vocabulary split over this many ranks (Megatron-style
    column/row splits, applied with DTensor; keep it within a node: it all-reduces activations in every block)."""
    dp: int = -1
    """Data-parallel degree (replicas, or shards under ZeRO); -1 infers world_size / (tp x pp)."""
    pp: int = 1
    """Pipeline-parallel degree: layers split into pp x virtual_stages stages, balanced."""
    virtual_stages: int = 1
    """Stages per pipeline rank; > 1 with the interleaved 1F1B schedule."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = "1f1b"
    sequence_parallel: bool = False
    """Also shard LayerNorm/dropout activations along the sequence over the tensor-parallel ranks."""
    zero_stage: int = 0
    """0: DDP replicas; 2: FSDP2, parameters kept gathered between forward and backward (ZeRO-2 like);
    3: FSDP2, parameters resharded after forward (ZeRO-3 like). With ``zero_engine: deepspeed``:
    DeepSpeed's ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)."""
    zero_engine: Literal["fsdp", "deepspeed"] = "fsdp"
    """``fsdp`` composes with tp and pp; ``deepspeed`` (tp = pp = 1) adds ZeRO-1 and optimizer offload."""
    optimizer_offload: bool = False
    """DeepSpeed: optimizer state and fp32 master weights on the CPU (ZeRO-Offload)."""
    loss_parallel: bool = True
    """With tp > 1, compute the cross-entropy on vocabulary-sharded logits (never gathering [B, T, V])."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing: ``full`` recomputes every block in backward, ``selective`` every
    ``recompute_every``-th block (block i with i % recompute_every == 0): memory for compute."""
    recompute_every: int = 2
    defer_grad_reduce: bool = False
    """FSDP: keep unsharded gradients across a step's micro-batches and reduce-scatter once after the
    last (fewer collectives, but every rank holds the whole model's gradients in the parameter dtype
    until the step ends; the planner counts it). Default: reduce-scatter after every micro-batch, so
    gradients stay sharded (torchtitan's default)."""
    fsdp_unit: Literal["block", "linear"] = "block"
    """FSDP: what one unit (one all-gather, one reduce-scatter) covers. ``block``: a transformer block
    (torchtitan's wrapping; fewest collectives). ``linear``: every linear layer of a block its own unit
    and the block the rest (its LayerNorms), so at most about two FFN matrices (4 d^2 each) are gathered
    and one has an unsharded gradient at a time instead of two whole blocks (12 d^2 each): for few-layer
    models, or many data-parallel ranks, where those transients rival the shard (docs/parallelism.md)."""
