"""The layouts of N GPUs that fit a model, cheapest first (``propose_layouts``), by the memory rules of
planner.py: a layout fits when its largest peak (start-up, accumulation or save) does."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ..model.config import GPTConfig
from .dims import FSDP_STAGES, RECOMPUTE_MODES, ZERO_STAGES, ParallelDims
from .planner import SAFETY_MARGIN, Workload, fits, plan_memory, planned_engine, shape_errors


@dataclass(kw_only=True, frozen=True)
class Proposal:
    """A layout that fits, its memory plan (``plan_memory``) and the key it was ranked by."""

    layout: ParallelDims
    memory: dict
    cost: tuple


def layout_cost(layout: ParallelDims, total_bytes: int) -> tuple:
    """Sort key of ``propose_layouts``, cheapest first, compared in this order:

    1. recompute none, then selective, then full (full recompute costs about one more forward pass, ~33 %
       more compute; selective/2 about half of that);
    2. no optimizer offload (host transfers every step);
    3. smaller model-parallel degree tp x pp (fewer per-block collectives and pipeline bubbles, more dp);
    4. lower ZeRO stage (stage 3 all-gathers the weights in forward and again in backward; stage 0 is
       plain all-reduce);
    5. at equal tp x pp, larger tp (Narayanan et al. 2021: tensor parallelism up to the GPUs of a node, then
       pipeline parallelism across nodes);
    6. smaller peak (more headroom).
    Batch size, network speed and pipeline bubble size are not modelled: the order is a starting point."""
    return (RECOMPUTE_MODES.index(layout.recompute), layout.optimizer_offload, layout.tp * layout.pp,
            layout.zero_stage, -layout.tp, total_bytes)


def propose_layouts(config: GPTConfig, *, n_gpus: int, gpus_per_node: int, gpu_memory_gib: float, seq_len: int,
                    micro_batch: int = 1, precision: str = "bf16", zero_stages: Sequence[int] = ZERO_STAGES,
                    recompute: Sequence[str] = RECOMPUTE_MODES, recompute_every: int = 2,
                    optimizer_offload: bool = False, sequence_parallel: bool = True,
                    defer_grad_reduce: bool = False, fsdp_unit: str = "block",
                    margin: float = SAFETY_MARGIN) -> list[Proposal]:
    """Every layout of exactly ``n_gpus`` GPUs whose start-up, accumulation and save peaks all fit, cheapest
    first (``layout_cost``).

    tp: powers of two up to ``gpus_per_node`` (and ``n_gpus``) that divide n_head, the FFN size and the
    padded vocabulary; pp: divisors of n_layer; dp = n_gpus / (tp pp), which must be whole. A ZeRO stage
    above 0 is only tried when dp > 1 (with one replica it shards nothing). ``defer_grad_reduce`` and
    ``fsdp_unit`` apply to the layouts that FSDP runs (ZeRO 2/3), the only ones that have the choice."""
    if n_gpus < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {n_gpus}")
    if gpus_per_node < 1:
        raise ValueError(f"GPUs per node must be >= 1, got {gpus_per_node}")
    work = Workload(seq_len=seq_len, micro_batch=micro_batch, precision=precision)
    tps = [2**k for k in range(n_gpus.bit_length()) if 2**k <= min(gpus_per_node, n_gpus)]
    pps = [p for p in range(1, config.n_layer + 1) if config.n_layer % p == 0]
    proposals = []
    for tp, pp, zero, mode in itertools.product(tps, pps, zero_stages, recompute):
        if n_gpus % (tp * pp):
            continue
        dp = n_gpus // (tp * pp)
        if zero > 0 and dp == 1:
            continue
        layout = ParallelDims(tp=tp, pp=pp, dp=dp, zero_stage=zero, recompute=mode, recompute_every=recompute_every,
                              optimizer_offload=optimizer_offload, sequence_parallel=sequence_parallel)
        if shape_errors(config, layout, work):
            continue
        if zero in FSDP_STAGES and planned_engine(layout, work) == "fsdp":
            layout = dataclasses.replace(layout, defer_grad_reduce=defer_grad_reduce, fsdp_unit=fsdp_unit)
        memory = plan_memory(config, layout, work)
        if fits(memory["total"], gpu_memory_gib, margin):
            proposals.append(Proposal(layout=layout, memory=memory, cost=layout_cost(layout, memory["total"])))
    return sorted(proposals, key=lambda proposal: proposal.cost)
