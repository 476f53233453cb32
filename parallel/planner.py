"""Memory per GPU of a GPT under a parallel layout (tp x pp x dp, ZeRO stage, recompute), without building it.

``plan_memory`` counts parameters analytically from ``GPTConfig`` (the same modules as ``model/gpt.py``) and
applies the rules below; ``propose_layouts`` enumerates layouts and keeps the ones that fit. The weight
sharding rules are checked against the trainer's own tensor-parallel and FSDP2 code on a fake process group
(``parallel/fake_mesh.py``, ``tests/test_planner.py``).

Rules (bytes per GPU; "16-bit" = bf16/fp16; w = 2 bytes in 16-bit, 4 in fp32):

Pipeline (pp)
    Stage k holds blocks [k L/pp, (k+1) L/pp). The first stage also holds the token and position embeddings;
    the last stage the final LayerNorm and, when pp > 1, its own copy of the tied token embedding for the
    output projection (as Megatron: the copy has weights, gradients and optimizer state, and is kept equal to
    the first stage's by an all-reduce of their gradients). With pp = 1 the one stage holds everything once.
    Every stage is planned; the result reports the one with the largest total.
Tensor parallel (tp)
    q/k/v and MLP-in matrices and their (column-parallel) biases, attention-out and MLP-out matrices, and the
    token-embedding rows (vocabulary-parallel) are divided by tp. LayerNorms, the biases of the row-parallel
    layers (attention-out, MLP-out) and the position embeddings are replicated on every tp rank.
ZeRO over dp
    stage 0: nothing sharded; 1: optimizer state and fp32 master weights divided by dp; 2: and gradients;
    3: and weights. ``optimizer_offload`` keeps optimizer state and master weights in host memory (0 GPU
    bytes; reported as ``host_bytes``).
State per parameter
    weights w, gradients w, fp32 master weights 4 (16-bit only), Adam's two fp32 moments 8.
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")
    A block stores 34 s b h bytes per micro-batch in 16-bit: their count with flash attention, which keeps no
    s^2 attention-score term. With tp and sequence parallelism all of it is divided by tp; with tp but no
    sequence parallelism s b h (10 + 24 / tp) (the LayerNorm/dropout regions stay replicated). A recomputed
    (checkpointed) block stores only its input, 2 s b h (divided by tp with sequence parallelism), and while it
    is recomputed in backward one block's full activations exist on top. fp32 doubles every activation byte.
    ``recompute``: ``none``; ``full`` checkpoints every block; ``selective`` checkpoints every
    ``recompute_every``-th block (block i with i % recompute_every == 0), as the trainer's
    ``parallel.recompute=selective`` does. (Korthikanti's own "selective" recomputation, of the attention
    scores only, saves nothing under flash attention, which never stores them: it is the same as ``none``.)
    1F1B pipeline schedule (Korthikanti section 4.2.1): stage k holds pp - k micro-batches in flight, so the
    first stage holds pp x (L / pp) = L blocks' worth of one micro-batch, whatever pp is.
    The last stage (or the only one) also holds the fp32 logits of one micro-batch, b s V / tp x 4 bytes
    (vocabulary-sharded: loss parallelism, the trainer's default with tp > 1).
ZeRO-3 gather buffers
    With zero 3 and dp > 1, the gathered 16-bit weights of two blocks (the one computing and the one being
    prefetched) are held on top of the shards.

Not counted (the ``fits`` safety margin covers them): the CUDA context, allocator fragmentation, NCCL
buffers, DDP/FSDP gradient buckets, matmul workspaces, the embedding output on the first stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..model.config import GPTConfig

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)
SAFETY_MARGIN = 0.10
"""Fraction of GPU memory ``fits`` leaves free: the CUDA context (~0.5-1 GiB), the caching allocator's
fragmentation and communication buffers, none of which ``plan_memory`` counts."""
GIB = 2**30
ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 master copy under mixed precision
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "gather_buffers")
"""The GPU byte counts that add up to ``total``."""


def value_errors(*, tp: int, pp: int, dp: int, zero_stage: int, micro_batch: int, seq_len: int, recompute: str,
                 recompute_every: int = 2, precision: str = "bf16",
                 names: Mapping[str, str] | None = None) -> list[str]:
    """Range problems of layout values, each naming its field as ``names`` spells it (CLI flags, say)."""
    name = (lambda key: (names or {}).get(key, key))  # noqa: E731
    errors = []
    for key, value in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch", micro_batch), ("seq_len", seq_len),
                       ("recompute_every", recompute_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"{name(key)} must be an integer >= 1, got {value!r}")
    if zero_stage not in ZERO_STAGES:
        errors.append(f"{name('zero_stage')} must be one of 0, 1, 2, 3, got {zero_stage!r}")
    if recompute not in RECOMPUTE_MODES:
        errors.append(f"{name('recompute')} must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    if precision not in PRECISION_BYTES:
        errors.append(f"{name('precision')} must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    return errors


@dataclass(kw_only=True, frozen=True)
class Layout:
    """How one training job is split over GPUs, and the per-GPU work that decides activation memory."""

    tp: int = 1
    """Tensor-parallel degree (keep it within a node: it all-reduces activations in every block)."""
    pp: int = 1
    """Pipeline-parallel stages (1F1B schedule)."""
    dp: int = 1
    """Data-parallel degree; ZeRO shards over these ranks."""
    zero_stage: int = 0
    """0 nothing sharded; 1 optimizer state + master weights; 2 + gradients; 3 + weights."""
    micro_batch: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    seq_len: int
    recompute: str = "none"
    """``none``, ``selective`` (every ``recompute_every``-th block) or ``full`` (every block)."""
    recompute_every: int = 2
    """With ``selective``: checkpoint block i when i % recompute_every == 0 (the trainer's default, 2)."""
    precision: str = "bf16"
    """Compute dtype of weights, gradients and activations: ``bf16``, ``fp16`` or ``fp32``."""
    optimizer_offload: bool = False
    """Optimizer state and master weights kept in host memory."""
    sequence_parallel: bool = True
    """With tp > 1, LayerNorm/dropout regions sharded along the sequence (the trainer's option)."""

    def __post_init__(self) -> None:
        errors = value_errors(tp=self.tp, pp=self.pp, dp=self.dp, zero_stage=self.zero_stage,
                              micro_batch=self.micro_batch, seq_len=self.seq_len, recompute=self.recompute,
                              recompute_every=self.recompute_every, precision=self.precision)
        if errors:
            raise ValueError("invalid layout: " + "; ".join(errors))

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        mode = f"selective/{self.recompute_every}" if self.recompute == "selective" else self.recompute
        offload = ", optimizer offload" if self.optimizer_offload else ""
        return f"tp{self.tp} x pp{self.pp} x dp{self.dp}, zero {self.zero_stage}, recompute {mode}{offload}"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero_stage": self.zero_stage,
                "micro_batch": self.micro_batch, "seq_len": self.seq_len, "recompute": self.recompute,
                "recompute_every": self.recompute_every, "precision": self.precision,
                "optimizer_offload": self.optimizer_offload, "sequence_parallel": self.sequence_parallel,
                "n_gpus": self.n_gpus}


def shape_errors(config: GPTConfig, layout: Layout, names: Mapping[str, str] | None = None) -> list[str]:
    """What this layout needs from the model's shape (whole heads per tp rank, whole blocks per stage)."""
    name = (lambda key: (names or {}).get(key, key))  # noqa: E731
    errors = []
    tp, pp = layout.tp, layout.pp
    if config.n_head % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the model's n_head ({config.n_head})")
    if config.ffn_dim % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the model's FFN size ({config.ffn_dim})")
    if config.padded_vocab_size % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the padded vocabulary ({config.padded_vocab_size})")
    if config.n_layer % pp:
        errors.append(f"{name('pp')} ({pp}) must divide the model's n_layer ({config.n_layer})")
    if layout.seq_len > config.context_length:
        errors.append(f"{name('seq_len')} ({layout.seq_len}) exceeds the model's context length "
                      f"({config.context_length})")
    if layout.sequence_parallel and tp > 1 and layout.seq_len % tp:
        errors.append(f"{name('seq_len')} ({layout.seq_len}) must be divisible by {name('tp')} ({tp}) "
                      f"with sequence parallelism")
    return errors


def trainer_settings(layout: Layout) -> dict:
    """The ``parallel.*`` config values that ask ``gptforge train`` for this layout (1F1B for pipelines).

    ZeRO-1 and optimizer offload exist only in the DeepSpeed engine (data parallel only), and so does fp16 with
    sharding (FSDP2 refuses fp16); ZeRO 2/3 otherwise go to FSDP2, which also composes with tensor parallelism."""
    data_parallel_only = layout.tp == 1 and layout.pp == 1
    deepspeed = (layout.zero_stage == 1 or layout.optimizer_offload
                 or (layout.precision == "fp16" and layout.zero_stage in (2, 3) and data_parallel_only))
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
            "sequence_parallel": layout.sequence_parallel and layout.tp > 1,
            "zero_stage": layout.zero_stage, "zero_engine": "deepspeed" if deepspeed else "fsdp",
            "optimizer_offload": layout.optimizer_offload, "recompute": layout.recompute,
            "recompute_every": layout.recompute_every, "pp_schedule": "1f1b"}


def trainer_gaps(layout: Layout, global_batch: int | None = None) -> list[str]:
    """Why ``gptforge train`` refuses this layout (empty when it runs it): the trainer's own validation of
    ``trainer_settings`` (``ParallelDims.resolve``, ``precision_errors``, ``micro_batch_errors``).
    ``global_batch`` (sequences per step) enables the 1F1B check of at least pp micro-batches per step."""
    from .dims import ParallelDims

    settings = trainer_settings(layout)
    errors: list[str] = []
    dims = ParallelDims.resolve(world_size=layout.n_gpus, errors=errors, **settings)
    if dims is None:
        return errors
    errors.extend(dims.precision_errors(layout.precision))
    if global_batch is not None:
        errors.extend(dims.micro_batch_errors(global_batch // (layout.micro_batch * layout.dp)))
    return errors


@dataclass(kw_only=True, frozen=True)
class ParamCounts:
    """Parameters held by one tensor-parallel rank, per module group (tp = 1: the whole model)."""

    token_embedding: int
    position_embedding: int
    block: int
    """One transformer block."""
    final_norm: int

    def total(self, n_layer: int) -> int:
        return self.token_embedding + self.position_embedding + n_layer * self.block + self.final_norm


def param_counts(config: GPTConfig, tp: int = 1) -> ParamCounts:
    """Count ``model/gpt.py``'s parameters on one tp rank (tp must divide heads, FFN and padded vocab)."""
    d, f, bias = config.d_model, config.ffn_dim, config.bias
    layer_norm = d + (d if bias else 0)

    def column(n_in: int, n_out: int) -> int:  # output features split over tp, bias split with them
        return n_in * n_out // tp + (n_out // tp if bias else 0)

    def row(n_in: int, n_out: int) -> int:  # input features split; the bias is added after the all-reduce
        return n_in * n_out // tp + (n_out if bias else 0)

    return ParamCounts(
        token_embedding=config.padded_vocab_size // tp * d,
        position_embedding=config.context_length * d,
        block=2 * layer_norm + 3 * column(d, d) + row(d, d) + column(d, f) + row(f, d),
        final_norm=layer_norm if config.final_norm else 0,
    )


def stage_role(index: int, pp: int) -> str:
    if pp == 1:
        return "only"
    return "first" if index == 0 else "last" if index == pp - 1 else "middle"


def stage_params(config: GPTConfig, layout: Layout, role: str) -> int:
    """Parameters per tp rank of a pipeline stage with ``role`` only/first/middle/last."""
    counts = param_counts(config, layout.tp)
    blocks = config.n_layer // layout.pp * counts.block
    return {
        "only": counts.total(config.n_layer),
        "first": counts.token_embedding + counts.position_embedding + blocks,
        "middle": blocks,
        # The output projection is tied to the token embedding: the last stage keeps its own copy.
        "last": counts.token_embedding + blocks + counts.final_norm,
    }[role]


def block_activation_bytes(config: GPTConfig, layout: Layout, *, checkpointed: bool) -> int:
    """Stored activations of one block for one micro-batch (Korthikanti et al. 2022, flash attention)."""
    sbh = layout.seq_len * layout.micro_batch * config.d_model
    tp, sp = layout.tp, layout.sequence_parallel and layout.tp > 1
    if checkpointed:
        per_block = 2 * sbh / (tp if sp else 1)  # only the block input, one 16-bit [s, b, h] tensor
    elif sp or tp == 1:
        per_block = 34 * sbh / tp
    else:  # the LayerNorm and dropout inputs (10 s b h) stay replicated over tp without sequence parallelism
        per_block = sbh * (10 + 24 / tp)
    return int(per_block * (2 if layout.precision == "fp32" else 1))


def checkpointed_blocks(layout: Layout, first_block: int, n_blocks: int) -> int:
    """How many of blocks [first_block, first_block + n_blocks) the recompute mode checkpoints."""
    if layout.recompute == "full":
        return n_blocks
    if layout.recompute == "selective":
        return sum(1 for i in range(first_block, first_block + n_blocks) if i % layout.recompute_every == 0)
    return 0


def stage_activation_bytes(config: GPTConfig, layout: Layout, index: int) -> int:
    layers = config.n_layer // layout.pp
    ckpt = checkpointed_blocks(layout, index * layers, layers)
    full = block_activation_bytes(config, layout, checkpointed=False)
    kept = block_activation_bytes(config, layout, checkpointed=True)
    in_flight = layout.pp - index  # 1F1B: stage k has pp - k micro-batches in flight
    total = in_flight * (ckpt * kept + (layers - ckpt) * full)
    if ckpt:
        total += full  # the block being recomputed in backward
    if stage_role(index, layout.pp) in ("last", "only"):
        total += layout.micro_batch * layout.seq_len * config.padded_vocab_size // layout.tp * 4  # fp32 logits
    return total


def stage_memory(config: GPTConfig, layout: Layout, index: int) -> dict:
    """GPU bytes of pipeline stage ``index`` (keys ``MEMORY_KEYS``, ``total``, ``host_bytes``, ``params``)."""
    role = stage_role(index, layout.pp)
    params = stage_params(config, layout, role)
    width = PRECISION_BYTES[layout.precision]
    dp, zero = layout.dp, layout.zero_stage

    def shard(nbytes: float, from_stage: int) -> float:
        return nbytes / dp if zero >= from_stage else nbytes

    master = shard(params * MASTER_BYTES, 1) if layout.precision != "fp32" else 0.0
    optimizer = shard(params * ADAM_BYTES, 1)
    host = 0.0
    if layout.optimizer_offload:
        host, master, optimizer = master + optimizer, 0.0, 0.0
    gather = 2 * param_counts(config, layout.tp).block * width if zero == 3 and dp > 1 else 0
    parts = {
        "weights": shard(params * width, 3),
        "gradients": shard(params * width, 2),
        "master_weights": master,
        "optimizer_state": optimizer,
        "activations": stage_activation_bytes(config, layout, index),
        "gather_buffers": gather,
    }
    out: dict = {key: int(round(value)) for key, value in parts.items()}
    out["total"] = sum(out.values())
    out |= {"host_bytes": int(round(host)), "params": params, "index": index, "role": role}
    return out


def plan_memory(config: GPTConfig, layout: Layout) -> dict:
    """Bytes per GPU of the largest pipeline stage under ``layout`` (rules in this module's docstring).

    Keys: ``MEMORY_KEYS`` and ``total`` (GPU bytes), ``host_bytes`` (offloaded optimizer), ``n_params`` (the
    whole model), ``params_per_rank`` (weights stored on the GPU), ``model_parallel_params`` (the stage's
    parameters on one tp rank, which its gradients and optimizer state cover before ZeRO), ``stage`` and
    ``stage_role`` (the largest stage), ``stages`` (every stage's breakdown).
    Raises ValueError when the layout does not fit the model's shape."""
    errors = shape_errors(config, layout)
    if errors:
        raise ValueError("; ".join(errors))
    stages = [stage_memory(config, layout, index) for index in range(layout.pp)]
    worst = max(stages, key=lambda stage: stage["total"])
    params = worst["params"]
    result = {key: worst[key] for key in (*MEMORY_KEYS, "total", "host_bytes")}
    result |= {
        "n_params": param_counts(config).total(config.n_layer),
        "params_per_rank": int(round(params / layout.dp)) if layout.zero_stage == 3 else params,
        "model_parallel_params": params,
        "stage": worst["index"],
        "stage_role": worst["role"],
        "stages": stages,
    }
    return result


def fits(total_bytes: int, gpu_memory_gib: float, margin: float = SAFETY_MARGIN) -> bool:
    """Whether ``total_bytes`` fits in ``gpu_memory_gib`` GiB with ``margin`` of it left free
    (``SAFETY_MARGIN``: the CUDA context, fragmentation and communication buffers are not in the plan)."""
    if gpu_memory_gib <= 0:
        raise ValueError(f"GPU memory must be > 0 GiB, got {gpu_memory_gib}")
    return total_bytes <= (1.0 - margin) * gpu_memory_gib * GIB


@dataclass(kw_only=True, frozen=True)
class Proposal:
    """A layout that fits, its memory plan and the key it was ranked by."""

    layout: Layout
    memory: dict
    cost: tuple


def layout_cost(layout: Layout, total_bytes: int) -> tuple:
    """Sort key of ``propose_layouts``, cheapest first, compared in this order:

    1. recompute none, then selective, then full (full recompute costs about one more forward pass, ~33 %
       more compute; selective/2 about half of that);
    2. no optimizer offload (host transfers every step);
    3. smaller model-parallel degree tp x pp (fewer per-block collectives and pipeline bubbles, more dp);
    4. lower ZeRO stage (stage 3 all-gathers the weights in forward and again in backward; stage 0 is
       plain all-reduce);
    5. at equal tp x pp, larger tp (Narayanan et al. 2021: tensor parallelism up to the GPUs of a node, then
       pipeline parallelism across nodes);
    6. smaller total (more headroom).
    Batch size, network speed and pipeline bubble size are not modelled: the order is a starting point."""
    return (RECOMPUTE_MODES.index(layout.recompute), layout.optimizer_offload, layout.tp * layout.pp,
            layout.zero_stage, -layout.tp, total_bytes)


def propose_layouts(config: GPTConfig, *, n_gpus: int, gpus_per_node: int, gpu_memory_gib: float, seq_len: int,
                    micro_batch: int = 1, precision: str = "bf16", zero_stages: Sequence[int] = ZERO_STAGES,
                    recompute: Sequence[str] = RECOMPUTE_MODES, recompute_every: int = 2,
                    optimizer_offload: bool = False, sequence_parallel: bool = True,
                    margin: float = SAFETY_MARGIN) -> list[Proposal]:
    """Every layout of exactly ``n_gpus`` GPUs that fits, cheapest first (``layout_cost``).

    tp: powers of two up to ``gpus_per_node`` (and ``n_gpus``) that divide n_head, the FFN size and the
    padded vocabulary; pp: divisors of n_layer; dp = n_gpus / (tp pp), which must be whole. A ZeRO stage
    above 0 is only tried when dp > 1 (with one replica it shards nothing)."""
    if n_gpus < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {n_gpus}")
    if gpus_per_node < 1:
        raise ValueError(f"GPUs per node must be >= 1, got {gpus_per_node}")
    tps = [2**k for k in range(n_gpus.bit_length()) if 2**k <= min(gpus_per_node, n_gpus)]
    pps = [p for p in range(1, config.n_layer + 1) if config.n_layer % p == 0]
    proposals = []
    for tp, pp, zero, mode in itertools.product(tps, pps, zero_stages, recompute):
        if n_gpus % (tp * pp):
            continue
        dp = n_gpus // (tp * pp)
        if zero > 0 and dp == 1:
            continue
        layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=micro_batch, seq_len=seq_len,
                        recompute=mode, recompute_every=recompute_every, precision=precision,
                        optimizer_offload=optimizer_offload, sequence_parallel=sequence_parallel)
        if shape_errors(config, layout):
            continue
        memory = plan_memory(config, layout)
        if fits(memory["total"], gpu_memory_gib, margin):
            proposals.append(Proposal(layout=layout, memory=memory, cost=layout_cost(layout, memory["total"])))
    return sorted(proposals, key=lambda proposal: proposal.cost)
