"""Memory per GPU of a GPT under a parallel layout (tp x pp x dp, ZeRO stage, recompute), without building it.

``plan_memory`` counts parameters analytically from ``GPTConfig`` (the same modules as ``model/gpt.py``) and
applies the rules below to a layout (``ParallelDims``, the trainer's own type) and the per-GPU work
(``Workload``); ``propose_layouts`` (propose.py) enumerates layouts and keeps the ones that fit. The weight
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

from collections.abc import Mapping
from dataclasses import dataclass

from ..model.config import GPTConfig
from .config import ParallelConfig
from .dims import ParallelDims

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
SAFETY_MARGIN = 0.10
"""Fraction of GPU memory ``fits`` leaves free: the CUDA context (~0.5-1 GiB), the caching allocator's
fragmentation and communication buffers, none of which ``plan_memory`` counts."""
GIB = 2**30
ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 master copy under mixed precision
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "gather_buffers")
"""The GPU byte counts that add up to ``total``."""


def work_errors(*, micro_batch: int, seq_len: int, precision: str,
                names: Mapping[str, str] | None = None) -> list[str]:
    """Range problems of a ``Workload``'s values, each naming its field as ``names`` spells it (CLI flags)."""
    name = (lambda key: (names or {}).get(key, key))  # noqa: E731
    errors = []
    for key, value in (("micro_batch", micro_batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"{name(key)} must be an integer >= 1, got {value!r}")
    if precision not in PRECISION_BYTES:
        errors.append(f"{name('precision')} must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    return errors


@dataclass(kw_only=True, frozen=True)
class Workload:
    """The per-GPU work of a job that decides activation memory; the layout itself is a ``ParallelDims``
    (the planner reads its degrees, ZeRO stage, recompute, offload and sequence parallelism; it plans the
    1F1B schedule, and ZeRO stages the same whichever engine runs them)."""

    seq_len: int
    micro_batch: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    precision: str = "bf16"
    """Compute dtype of weights, gradients and activations: ``bf16``, ``fp16`` or ``fp32``."""

    def __post_init__(self) -> None:
        errors = work_errors(micro_batch=self.micro_batch, seq_len=self.seq_len, precision=self.precision)
        if errors:
            raise ValueError("invalid workload: " + "; ".join(errors))


def layout_dict(dims: ParallelDims, work: Workload) -> dict:
    """The JSON ``layout`` of ``gptforge plan``: the planned layout and work."""
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": dims.zero_stage,
            "micro_batch": work.micro_batch, "seq_len": work.seq_len, "recompute": dims.recompute,
            "recompute_every": dims.recompute_every, "precision": work.precision,
            "optimizer_offload": dims.optimizer_offload, "sequence_parallel": dims.sequence_parallel,
            "n_gpus": dims.world_size}


def shape_errors(config: GPTConfig, dims: ParallelDims, work: Workload,
                 names: Mapping[str, str] | None = None) -> list[str]:
    """What this layout needs from the model's shape (whole heads per tp rank, whole blocks per stage)."""
    name = (lambda key: (names or {}).get(key, key))  # noqa: E731
    errors = []
    tp, pp = dims.tp, dims.pp
    if config.n_head % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the model's n_head ({config.n_head})")
    if config.ffn_dim % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the model's FFN size ({config.ffn_dim})")
    if config.padded_vocab_size % tp:
        errors.append(f"{name('tp')} ({tp}) must divide the padded vocabulary ({config.padded_vocab_size})")
    if config.n_layer % pp:
        errors.append(f"{name('pp')} ({pp}) must divide the model's n_layer ({config.n_layer})")
    if work.seq_len > config.context_length:
        errors.append(f"{name('seq_len')} ({work.seq_len}) exceeds the model's context length "
                      f"({config.context_length})")
    if dims.sequence_parallel and tp > 1 and work.seq_len % tp:
        errors.append(f"{name('seq_len')} ({work.seq_len}) must be divisible by {name('tp')} ({tp}) "
                      f"with sequence parallelism")
    return errors


def trainer_settings(dims: ParallelDims, work: Workload) -> dict:
    """The ``parallel.*`` config values that ask ``gptforge train`` for this layout (1F1B for pipelines).

    ZeRO-1 and optimizer offload exist only in the DeepSpeed engine (data parallel only), and so does fp16 with
    sharding (FSDP2 refuses fp16); ZeRO 2/3 otherwise go to FSDP2, which also composes with tensor parallelism."""
    data_parallel_only = dims.tp == 1 and dims.pp == 1
    deepspeed = (dims.zero_stage == 1 or dims.optimizer_offload
                 or (work.precision == "fp16" and dims.zero_stage in (2, 3) and data_parallel_only))
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp,
            "sequence_parallel": dims.sequence_parallel and dims.tp > 1,
            "zero_stage": dims.zero_stage, "zero_engine": "deepspeed" if deepspeed else "fsdp",
            "optimizer_offload": dims.optimizer_offload, "recompute": dims.recompute,
            "recompute_every": dims.recompute_every, "pp_schedule": "1f1b"}


def trainer_gaps(dims: ParallelDims, work: Workload, global_batch: int | None = None) -> list[str]:
    """Why ``gptforge train`` refuses this layout (empty when it runs it): the trainer's own validation of
    ``trainer_settings`` (``ParallelDims.from_config``, ``precision_errors``, ``micro_batch_errors``).
    ``global_batch`` (sequences per step) enables the 1F1B check of at least pp micro-batches per step."""
    errors: list[str] = []
    trainer = ParallelDims.from_config(ParallelConfig(**trainer_settings(dims, work)), dims.world_size, errors)
    if trainer is None:
        return errors
    errors.extend(trainer.precision_errors(work.precision))
    if global_batch is not None:
        errors.extend(trainer.micro_batch_errors(global_batch // (work.micro_batch * dims.dp)))
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


def stage_params(config: GPTConfig, dims: ParallelDims, role: str) -> int:
    """Parameters per tp rank of a pipeline stage with ``role`` only/first/middle/last."""
    counts = param_counts(config, dims.tp)
    blocks = config.n_layer // dims.pp * counts.block
    return {
        "only": counts.total(config.n_layer),
        "first": counts.token_embedding + counts.position_embedding + blocks,
        "middle": blocks,
        # The output projection is tied to the token embedding: the last stage keeps its own copy.
        "last": counts.token_embedding + blocks + counts.final_norm,
    }[role]


def block_activation_bytes(config: GPTConfig, dims: ParallelDims, work: Workload, *, checkpointed: bool) -> int:
    """Stored activations of one block for one micro-batch (Korthikanti et al. 2022, flash attention)."""
    sbh = work.seq_len * work.micro_batch * config.d_model
    tp, sp = dims.tp, dims.sequence_parallel and dims.tp > 1
    if checkpointed:
        per_block = 2 * sbh / (tp if sp else 1)  # only the block input, one 16-bit [s, b, h] tensor
    elif sp or tp == 1:
        per_block = 34 * sbh / tp
    else:  # the LayerNorm and dropout inputs (10 s b h) stay replicated over tp without sequence parallelism
        per_block = sbh * (10 + 24 / tp)
    return int(per_block * (2 if work.precision == "fp32" else 1))


def checkpointed_blocks(dims: ParallelDims, first_block: int, n_blocks: int) -> int:
    """How many of blocks [first_block, first_block + n_blocks) the recompute mode checkpoints."""
    if dims.recompute == "full":
        return n_blocks
    if dims.recompute == "selective":
        return sum(1 for i in range(first_block, first_block + n_blocks) if i % dims.recompute_every == 0)
    return 0


def stage_activation_bytes(config: GPTConfig, dims: ParallelDims, work: Workload, index: int) -> int:
    layers = config.n_layer // dims.pp
    ckpt = checkpointed_blocks(dims, index * layers, layers)
    full = block_activation_bytes(config, dims, work, checkpointed=False)
    kept = block_activation_bytes(config, dims, work, checkpointed=True)
    in_flight = dims.pp - index  # 1F1B: stage k has pp - k micro-batches in flight
    total = in_flight * (ckpt * kept + (layers - ckpt) * full)
    if ckpt:
        total += full  # the block being recomputed in backward
    if stage_role(index, dims.pp) in ("last", "only"):
        total += work.micro_batch * work.seq_len * config.padded_vocab_size // dims.tp * 4  # fp32 logits
    return total


def stage_memory(config: GPTConfig, dims: ParallelDims, work: Workload, index: int) -> dict:
    """GPU bytes of pipeline stage ``index`` (keys ``MEMORY_KEYS``, ``total``, ``host_bytes``, ``params``)."""
    role = stage_role(index, dims.pp)
    params = stage_params(config, dims, role)
    width = PRECISION_BYTES[work.precision]
    dp, zero = dims.dp, dims.zero_stage

    def shard(nbytes: float, from_stage: int) -> float:
        return nbytes / dp if zero >= from_stage else nbytes

    master = shard(params * MASTER_BYTES, 1) if work.precision != "fp32" else 0.0
    optimizer = shard(params * ADAM_BYTES, 1)
    host = 0.0
    if dims.optimizer_offload:
        host, master, optimizer = master + optimizer, 0.0, 0.0
    gather = 2 * param_counts(config, dims.tp).block * width if zero == 3 and dp > 1 else 0
    parts = {
        "weights": shard(params * width, 3),
        "gradients": shard(params * width, 2),
        "master_weights": master,
        "optimizer_state": optimizer,
        "activations": stage_activation_bytes(config, dims, work, index),
        "gather_buffers": gather,
    }
    out: dict = {key: int(round(value)) for key, value in parts.items()}
    out["total"] = sum(out.values())
    out |= {"host_bytes": int(round(host)), "params": params, "index": index, "role": role}
    return out


def plan_memory(config: GPTConfig, dims: ParallelDims, work: Workload) -> dict:
    """Bytes per GPU of the largest pipeline stage of ``work`` under ``dims`` (rules in this module's docstring).

    Keys: ``MEMORY_KEYS`` and ``total`` (GPU bytes), ``host_bytes`` (offloaded optimizer), ``n_params`` (the
    whole model), ``params_per_rank`` (weights stored on the GPU), ``model_parallel_params`` (the stage's
    parameters on one tp rank, which its gradients and optimizer state cover before ZeRO), ``stage`` and
    ``stage_role`` (the largest stage), ``stages`` (every stage's breakdown).
    Raises ValueError when the layout does not fit the model's shape."""
    errors = shape_errors(config, dims, work)
    if errors:
        raise ValueError("; ".join(errors))
    stages = [stage_memory(config, dims, work, index) for index in range(dims.pp)]
    worst = max(stages, key=lambda stage: stage["total"])
    params = worst["params"]
    result = {key: worst[key] for key in (*MEMORY_KEYS, "total", "host_bytes")}
    result |= {
        "n_params": param_counts(config).total(config.n_layer),
        "params_per_rank": int(round(params / dims.dp)) if dims.zero_stage == 3 else params,
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
