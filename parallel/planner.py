"""Memory per GPU of a GPT under a parallel layout (tp x pp x dp, ZeRO stage, recompute), without building it.

``plan_memory`` counts parameters analytically from ``GPTConfig`` (the same modules as ``model/gpt.py``) and
applies the rules below; ``propose_layouts`` enumerates layouts and keeps the ones that fit. The weight
sharding rules are checked against the trainer's own tensor-parallel and FSDP2 code on a fake process group
(``parallel/fake_mesh.py``, ``tests/test_planner.py``).

Rules (bytes per rank; "16-bit" = bf16/fp16, w = 2 bytes in 16-bit and 4 in fp32):

Pipeline (pp)
    A stage holds ``n_layer / pp`` blocks. The first stage also holds the token and position embeddings; the
    last stage holds the final LayerNorm and, when pp > 1, its own copy of the tied token embedding for the
    output projection (Megatron keeps that copy in sync with an all-reduce; it has weights, gradients and
    optimizer state like any other parameter). With pp = 1 the one stage holds everything once. The reported
    numbers are those of the stage with the largest total. Middle stages are never the largest: they hold
    fewer parameters and fewer micro-batches in flight than the first stage.
Tensor parallel (tp)
    q/k/v and MLP-in matrices and their (column-parallel) biases, attention-out and MLP-out matrices, and the
    token-embedding rows (vocabulary-parallel) are divided by tp. LayerNorms, the biases of the row-parallel
    layers (attention-out, MLP-out) and the position embeddings are replicated on every tp rank.
ZeRO over dp
    stage 0: nothing sharded; 1: optimizer state and fp32 master weights divided by dp; 2: and gradients;
    3: and weights. ``optimizer_offload`` keeps optimizer state and master weights in host memory (0 GPU bytes;
    reported separately as ``host_bytes``).
State per parameter
    weights w, gradients w (in the compute dtype), fp32 master weights 4 (16-bit only), Adam moments 2 x 4.
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")
    Per layer and micro-batch, with flash attention (no s^2 attention-score term): 34 s b h bytes in 16-bit.
    With tp and sequence parallelism all of it is divided by tp; with tp but no sequence parallelism
    s b h (10 + 24 / tp) (the LayerNorm/dropout regions stay replicated). ``recompute="full"`` keeps only each
    layer's input, 2 s b h (divided by tp with sequence parallelism), plus one layer's full activations while
    that layer is recomputed in backward. ``recompute="selective"`` recomputes the attention-score part only,
    which flash attention never stores, so it equals ``"none"`` here. fp32 doubles every activation byte.
    1F1B pipeline schedule (Korthikanti section 4.2.1): stage i holds pp - i micro-batches in flight, so the
    first stage holds (n_layer / pp) x pp layers' worth, i.e. n_layer x one micro-batch, whatever pp is.
    The last stage (or the only one) also holds the fp32 logits of one micro-batch: b s V / tp x 4 bytes
    (vocabulary-sharded logits: loss parallelism, the trainer's default with tp > 1).
ZeRO-3 gather buffers
    With zero 3 and dp > 1, the gathered 16-bit weights of two blocks (the one computing and the one being
    prefetched) are held on top of the shards.

Not counted (covered by the ``fits`` safety margin): the CUDA context, allocator fragmentation, NCCL buffers,
DDP/FSDP gradient buckets, temporary matmul workspaces.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gptforge.model.config import GPTConfig

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)
SAFETY_MARGIN = 0.10
"""Fraction of GPU memory ``fits`` leaves free: the CUDA context (~0.5-1 GiB), the caching allocator's
fragmentation and communication buffers, none of which ``plan_memory`` counts."""
GIB = 2**30
ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 master copy in mixed precision


def value_errors(*, tp: int, pp: int, dp: int, zero_stage: int, micro_batch: int, seq_len: int, recompute: str,
                 precision: str, names: Mapping[str, str] | None = None) -> list[str]:
    """Range problems of layout values, each naming its field as ``names`` spells it (CLI flags, say)."""
    name = (lambda key: (names or {}).get(key, key))  # noqa: E731
    errors = []
    for key, value in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch", micro_batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
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
    """Tensor-parallel degree (within a node: it all-reduces activations every layer)."""
    pp: int = 1
    """Pipeline-parallel stages (1F1B schedule)."""
    dp: int = 1
    """Data-parallel degree; ZeRO shards over these ranks."""
    zero_stage: int = 0
    """0 nothing sharded, 1 optimizer state + master weights, 2 + gradients, 3 + weights."""
    micro_batch: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    seq_len: int
    recompute: str = "none"
    """``none``, ``selective`` (attention scores only; same as none with flash attention) or ``full``."""
    precision: str = "bf16"
    """Compute dtype of weights, gradients and activations: ``bf16``, ``fp16`` or ``fp32``."""
    optimizer_offload: bool = False
    """Optimizer state and master weights in host memory."""
    sequence_parallel: bool = True
    """With tp > 1, LayerNorm/dropout regions sharded along the sequence (the trainer's option)."""

    def __post_init__(self) -> None:
        errors = value_errors(tp=self.tp, pp=self.pp, dp=self.dp, zero_stage=self.zero_stage,
                              micro_batch=self.micro_batch, seq_len=self.seq_len, recompute=self.recompute,
                              precision=self.precision)
        if errors:
            raise ValueError("invalid layout: " + "; ".join(errors))

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        offload = ", optimizer offload" if self.optimizer_offload else ""
        return (f"tp{self.tp} x pp{self.pp} x dp{self.dp}, zero {self.zero_stage}, "
                f"recompute {self.recompute}{offload}")

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero_stage": self.zero_stage,
                "micro_batch": self.micro_batch, "seq_len": self.seq_len, "recompute": self.recompute,
                "precision": self.precision, "optimizer_offload": self.optimizer_offload,
                "sequence_parallel": self.sequence_parallel, "n_gpus": self.n_gpus}


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
    column = lambda n_in, n_out: n_in * n_out // tp + (n_out // tp if bias else 0)  # noqa: E731 (bias sharded)
    row = lambda n_in, n_out: n_in * n_out // tp + (n_out if bias else 0)  # noqa: E731 (bias replicated)
    block = 2 * layer_norm + 3 * column(d, d) + row(d, d) + column(d, f) + row(f, d)
    return ParamCounts(
        token_embedding=config.padded_vocab_size // tp * d,
        position_embedding=config.context_length * d,
        block=block,
        final_norm=layer_norm if config.final_norm else 0,
    )


def stage_params(config: GPTConfig, layout: Layout) -> dict[str, int]:
    """Parameters per tp rank of each distinct pipeline stage: ``only`` (pp = 1) or ``first`` and ``last``."""
    counts = param_counts(config, layout.tp)
    blocks = config.n_layer // layout.pp * counts.block
    if layout.pp == 1:
        return {"only": counts.total(config.n_layer)}
    return {
        "first": counts.token_embedding + counts.position_embedding + blocks,
        # The output projection is tied to the token embedding: the last stage keeps its own copy.
        "last": counts.token_embedding + blocks + counts.final_norm,
    }


def activation_bytes_per_layer(config: GPTConfig, layout: Layout) -> int:
    """Stored activations of one block for one micro-batch (Korthikanti et al. 2022, flash attention)."""
    sbh = layout.seq_len * layout.micro_batch * config.d_model
    tp, sp = layout.tp, layout.sequence_parallel and layout.tp > 1
    if layout.recompute == "full":
        per_layer = 2 * sbh / (tp if sp else 1)  # only the block input (a 16-bit [s, b, h] tensor)
    elif sp or tp == 1:
        per_layer = 34 * sbh / tp
    else:  # LayerNorm and dropout inputs (10 s b h) are replicated over tp without sequence parallelism
        per_layer = sbh * (10 + 24 / tp)
    dtype_factor = 2 if layout.precision == "fp32" else 1
    return int(per_layer * dtype_factor)


def _full_layer_activation_bytes(config: GPTConfig, layout: Layout) -> int:
    """One block's activations without recompute (the workspace while a block is recomputed)."""
    return activation_bytes_per_layer(config, dataclasses.replace(layout, recompute="none"))


def _stage_memory(config: GPTConfig, layout: Layout, stage: str, params: int) -> dict[str, int]:
    width = PRECISION_BYTES[layout.precision]
    dp, zero = layout.dp, layout.zero_stage
    shard = lambda nbytes, from_stage: nbytes / dp if zero >= from_stage else nbytes  # noqa: E731
    weights = shard(params * width, 3)
    gradients = shard(params * width, 2)
    master = shard(params * MASTER_BYTES, 1) if layout.precision != "fp32" else 0
    optimizer = shard(params * ADAM_BYTES, 1)
    host = 0.0
    if layout.optimizer_offload:
        host, master, optimizer = master + optimizer, 0, 0

    layers = config.n_layer // layout.pp
    in_flight = layout.pp if stage == "first" else 1  # 1F1B: stage i has pp - i micro-batches in flight
    activations = layers * in_flight * activation_bytes_per_layer(config, layout)
    if layout.recompute == "full":
        activations += _full_layer_activation_bytes(config, layout)
    if stage in ("last", "only"):
        logits = layout.micro_batch * layout.seq_len * config.padded_vocab_size / layout.tp * 4
        activations += logits

    gather = 0
    if zero == 3 and dp > 1:
        gather = 2 * param_counts(config, layout.tp).block * width
    parts = {"weights": weights, "gradients": gradients, "master_weights": master, "optimizer_state": optimizer,
             "activations": activations, "gather_buffers": gather}
    out = {key: int(round(value)) for key, value in parts.items()}
    out["total"] = sum(out.values())
    out["host_bytes"] = int(round(host))
    out["params"] = params
    return out


def plan_memory(config: GPTConfig, layout: Layout) -> dict:
    """Bytes per GPU of the largest pipeline stage under ``layout`` (rules in this module's docstring).

    Keys: ``weights``, ``gradients``, ``master_weights``, ``optimizer_state``, ``activations``,
    ``gather_buffers``, ``total`` (GPU bytes), ``host_bytes`` (offloaded optimizer), ``n_params`` (the whole
    model), ``params_per_rank`` (weights stored on this GPU), ``model_parallel_params`` (this rank's tp/pp
    share before ZeRO), ``stage`` (which stage is the largest) and ``stages`` (every distinct stage).
    Raises ValueError when the layout does not fit the model's shape."""
    errors = shape_errors(config, layout)
    if errors:
        raise ValueError("; ".join(errors))
    stages = {name: _stage_memory(config, layout, name, params)
              for name, params in stage_params(config, layout).items()}
    worst = max(stages, key=lambda name: stages[name]["total"])
    chosen = stages[worst]
    model_parallel = chosen["params"]
    stored = model_parallel / layout.dp if layout.zero_stage == 3 else model_parallel
    result = {key: value for key, value in chosen.items() if key != "params"}
    result |= {
        "n_params": param_counts(config).total(config.n_layer),
        "params_per_rank": int(round(stored)),
        "model_parallel_params": model_parallel,
        "stage": worst,
        "stages": stages,
    }
    return result


def fits(total_bytes: int, gpu_memory_gib: float, margin: float = SAFETY_MARGIN) -> bool:
    """Whether ``total_bytes`` fits in ``gpu_memory_gib`` GiB leaving ``margin`` of it free (see
    ``SAFETY_MARGIN``: CUDA context, fragmentation and communication buffers are not in the plan)."""
    if gpu_memory_gib <= 0:
        raise ValueError(f"gpu memory must be > 0 GiB, got {gpu_memory_gib}")
    return total_bytes <= (1.0 - margin) * gpu_memory_gib * GIB


@dataclass(kw_only=True, frozen=True)
class Proposal:
    """A layout that fits, its memory plan and the sort key it was ranked by."""

    layout: Layout
    memory: dict
    cost: tuple


def layout_cost(layout: Layout, total_bytes: int) -> tuple:
    """Sort key of ``propose_layouts``, cheapest first:

    1. no recompute before full recompute (full recompute costs about one more forward pass, ~33 % compute);
    2. optimizer offload last (host transfers every step);
    3. smaller model-parallel degree tp x pp (fewer per-layer collectives and pipeline bubbles, more dp);
    4. lower ZeRO stage (stage 3 gathers weights twice per step, stages 1-2 reduce-scatter instead of
       all-reduce: same volume, stage 0 simplest);
    5. at equal tp x pp, larger tp (Narayanan et al. 2021: tensor parallelism up to the node size first, then
       pipeline parallelism across nodes);
    6. smaller memory total (more headroom)."""
    return (layout.recompute == "full", layout.optimizer_offload, layout.tp * layout.pp, layout.zero_stage,
            -layout.tp, total_bytes)


def propose_layouts(config: GPTConfig, *, n_gpus: int, gpus_per_node: int, gpu_memory_gib: float, seq_len: int,
                    micro_batch: int = 1, precision: str = "bf16", zero_stages: Sequence[int] = ZERO_STAGES,
                    recompute: Sequence[str] = ("none", "full"), optimizer_offload: bool = False,
                    sequence_parallel: bool = True, margin: float = SAFETY_MARGIN) -> list[Proposal]:
    """Every layout of ``n_gpus`` that fits, cheapest first (``layout_cost``).

    tp: powers of two up to ``gpus_per_node`` (and ``n_gpus``) that divide n_head, the FFN size and the
    padded vocabulary; pp: divisors of n_layer; dp = n_gpus / (tp pp), which must be whole. A ZeRO stage above
    0 is only tried when dp > 1 (with one replica it shards nothing). ``recompute`` defaults to none and full:
    selective equals none under flash attention (module docstring)."""
    if n_gpus < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {n_gpus}")
    if gpus_per_node < 1:
        raise ValueError(f"GPUs per node must be >= 1, got {gpus_per_node}")
    tps = [t for t in (2**k for k in range(0, 16)) if t <= min(gpus_per_node, n_gpus)]
    pps = [p for p in range(1, config.n_layer + 1) if config.n_layer % p == 0]
    proposals = []
    for tp, pp, zero, mode in itertools.product(tps, pps, zero_stages, recompute):
        if n_gpus % (tp * pp):
            continue
        dp = n_gpus // (tp * pp)
        if zero > 0 and dp == 1:
            continue
        layout = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=micro_batch, seq_len=seq_len,
                        recompute=mode, precision=precision, optimizer_offload=optimizer_offload,
                        sequence_parallel=sequence_parallel)
        if shape_errors(config, layout):
            continue
        memory = plan_memory(config, layout)
        if fits(memory["total"], gpu_memory_gib, margin):
            proposals.append(Proposal(layout=layout, memory=memory, cost=layout_cost(layout, memory["total"])))
    return sorted(proposals, key=lambda p: p.cost)
