"""Memory per GPU of a GPT under a parallel layout (tp x pp x dp, ZeRO stage, recompute), at the three peaks
of a run, without building it.

``plan_memory`` counts parameters analytically from ``GPTConfig`` (the same modules as ``model/gpt.py``) and
applies the rules below to a layout (``ParallelDims``, the trainer's own type) and the per-GPU work
(``Workload``); ``propose_layouts`` (propose.py) enumerates layouts and keeps the ones whose every peak fits.
The weight sharding rules are checked against the trainer's own tensor-parallel and FSDP2 code on a fake
process group (``parallel/fake_mesh.py``, ``tests/test_planner.py``); the peaks against real CPU runs by
``bench/memory.py``.

Rules (bytes per GPU; "16-bit" = bf16/fp16; w = 2 bytes in 16-bit, 4 in fp32):

Pipeline (pp)
    Stage k holds blocks [k L/pp, (k+1) L/pp). The first stage also holds the token and position embeddings;
    the last stage the final LayerNorm and, when pp > 1, its own copy of the tied token embedding for the
    output projection (as Megatron: the copy has weights, gradients and optimizer state, and is kept equal to
    the first stage's by an all-reduce of their gradients). With pp = 1 the one stage holds everything once.
    Every stage is planned; each peak reports its largest stage.
Tensor parallel (tp)
    q/k/v and MLP-in matrices and their (column-parallel) biases, attention-out and MLP-out matrices, and the
    token-embedding rows (vocabulary-parallel) are divided by tp. LayerNorms, the biases of the row-parallel
    layers (attention-out, MLP-out) and the position embeddings are replicated on every tp rank.
Engine (``planned_engine``: the one ``gptforge train`` would use, ``trainer_settings``)
    ``replicas``: ZeRO 0 (DDP, or the pipeline's own gradient averaging). ``fsdp``: ZeRO 2/3 with FSDP2, one
    unit per block plus the stage's other parameters (embeddings, final norm) as the root unit.
    ``deepspeed``: ZeRO 1, optimizer offload, fp16 with sharding, or ``zero_engine: deepspeed``.
State per parameter (the Megatron/DeepSpeed convention)
    weights w, gradients w, fp32 master weights 4 (16-bit only; DeepSpeed ZeRO 1/2 keep a separate fp32
    partition in fp32 too), Adam's two fp32 moments 8. ZeRO over dp: stage 1 divides master weights and
    optimizer state by dp; 2 also the gradients; 3 also the weights. FSDP2 stores every parameter sharded,
    ZeRO-2 included (what ZeRO-2 keeps unsharded is the gathered copy, below). ``optimizer_offload`` keeps
    master weights and optimizer state in host memory (``host_bytes``).
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
    The last stage (or the only one) also holds the fp32 logits of one micro-batch and their gradient,
    2 x b s V / tp x 4 bytes (vocabulary-sharded: loss parallelism, the trainer's default with tp > 1).

The three peaks (``PHASES``; each a named breakdown, ``MEMORY_KEYS``):

start-up (after the model and optimizer are built, before the first step)
    Each rank materialises and initialises only its own shard, drawing one row block of
    ``INIT_BLOCK_ELEMENTS`` fp32 elements at a time (``init_buffers``): weights and master weights as
    stored. Adam's moments appear at the first step (torch's AdamW and DeepSpeed's partitions alike).
    ``replicas`` with DDP: the whole replica, DDP's fp32 gradient buckets (allocated by its constructor)
    and one 250 MiB bucket of its start-up broadcast of the replica. ``deepspeed`` ZeRO-3: its gradient
    partitions and reduce bucket (both allocated at initialisation), ``deepspeed.zero.Init``'s
    materialisation of the largest parameter whole before it is partitioned, and the zero-filled fp32
    gradient buffer of its partition with which it sets up the optimizer.
accumulation (the steady training peak, from the second step on: the larger of backward and optimizer step)
    backward: stored state, gradients and optimizer state, the activations, and
    - ``fsdp`` ZeRO-3: the gathered compute-dtype weights of the root unit (used at both ends of the model,
      kept through forward and backward) and of two blocks (the one computing and the one prefetched) or,
      with ``fsdp_unit: linear``, of two of the largest linear layers and a block's LayerNorms (and a
      root without the position embedding, gathered only at the step's ends);
      ZeRO-2: the whole stage gathered (kept from forward until backward);
    - ``fsdp`` gradients (``unsharded_gradients``): reduce-scattered after every micro-batch, so beyond
      their shard one unit's unsharded gradient and its fp32 reduce-scatter input, while the root unit's
      gradient stays unsharded for the whole backward (the tied embedding gets the output projection's
      gradient first and the lookup's last); with ``defer_grad_reduce`` the whole stage's unsharded
      gradients in the compute dtype until the step's last micro-batch, plus one unit's reduce-scatter input;
    - ``deepspeed``: its reduce bucket(s) (``reduce_bucket_size`` elements, two with ``overlap_comm``) and,
      ZeRO-3, the gathered parameters its limits allow (``stage3_prefetch_bucket_size`` and
      ``stage3_max_reuse_distance`` parameters beyond one block, at most the stage);
    - ``replicas`` with DDP: its fp32 gradient buckets.
    optimizer step: stored state, gradients, optimizer state and one fp32 temporary the size of a moment
    (torch's foreach AdamW, e.g. the square root of the second moment), plus the persistent buffers above;
    ``deepspeed`` steps its flat partition as one tensor: two such temporaries at once, and under ZeRO-3
    a third, its flattened copy of the partition's gradients.
save (a checkpoint after the optimizer step; gradients are freed by then)
    device: stored weights, master weights and optimizer state, plus what persists (DDP buckets,
    DeepSpeed's buckets, gradient partitions and kept ZeRO-3 parameters). host (``host_staging``, reported
    apart: not GPU memory): the asynchronous save copies the rank's model and optimizer state to host
    memory, fp32 weights and both Adam moments, 12 bytes per parameter of its shard (its whole stage
    without ZeRO).

Not counted (the ``fits`` safety margin covers them): the CUDA context, allocator fragmentation, NCCL
buffers, matmul workspaces, the embedding output on the first stage, pipeline send/receive buffers,
DeepSpeed's persistent small parameters (below ``stage3_param_persistence_threshold``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..model.config import GPTConfig
from ..model.gpt import INIT_BLOCK_ELEMENTS
from .config import ParallelConfig
from .dims import FSDP_STAGES, ParallelDims

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
SAFETY_MARGIN = 0.10
"""Fraction of GPU memory ``fits`` leaves free: the CUDA context (~0.5-1 GiB), the caching allocator's
fragmentation and communication buffers, none of which ``plan_memory`` counts."""
GIB = 2**30
ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # fp32 master copy under mixed precision
FP32_BYTES = 4
CHECKPOINT_BYTES = MASTER_BYTES + ADAM_BYTES
"""What a checkpoint holds per parameter: fp32 weights and the two Adam moments."""
DDP_BROADCAST_BUCKET_BYTES = 250 * 2**20
"""torch DDP's ``broadcast_bucket_size``: its constructor broadcasts the replica in buckets of this size."""
DEEPSPEED_ZERO_DEFAULTS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}
"""DeepSpeed's defaults (``deepspeed/runtime/zero/config.py``) for the ``zero_optimization`` keys the
planner reads, where the trainer's DeepSpeed config does not set them."""
PHASES = ("startup", "accumulation", "save")
PHASE_LABELS = {"startup": "start-up", "accumulation": "accumulation", "save": "save"}
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "gather_buffers",
               "unsharded_gradients", "optimizer_temporaries", "comm_buffers", "init_buffers")
"""The GPU byte counts that add up to a peak's ``total`` (those a phase lacks are 0)."""
KEY_LABELS = {"weights": "weights", "gradients": "grads", "master_weights": "master", "optimizer_state": "adam",
              "activations": "activations", "gather_buffers": "gathered", "unsharded_gradients": "unsharded grads",
              "optimizer_temporaries": "adam temp", "comm_buffers": "buckets", "init_buffers": "init"}
"""Short names of the breakdown, for ``gptforge plan``'s text output."""


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
    (the planner reads its degrees, ZeRO stage and engine, recompute, offload, sequence parallelism and
    ``defer_grad_reduce``; it plans the 1F1B schedule)."""

    seq_len: int
    micro_batch: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    precision: str = "bf16"
    """Compute dtype of weights, gradients and activations: ``bf16``, ``fp16`` or ``fp32``."""

    def __post_init__(self) -> None:
        errors = work_errors(micro_batch=self.micro_batch, seq_len=self.seq_len, precision=self.precision)
        if errors:
            raise ValueError("invalid workload: " + "; ".join(errors))


def planned_engine(dims: ParallelDims, work: Workload) -> str:
    """``replicas``, ``fsdp`` or ``deepspeed``: what runs the data-parallel work of this layout in
    ``gptforge train`` (``trainer_settings``), also for layouts the trainer refuses."""
    if trainer_settings(dims, work)["zero_engine"] == "deepspeed":
        return "deepspeed"
    return "fsdp" if dims.zero_stage in FSDP_STAGES else "replicas"


def defers_grad_reduce(dims: ParallelDims, work: Workload) -> bool:
    """Whether the planned run keeps unsharded gradients to the step's last micro-batch (FSDP only)."""
    return dims.defer_grad_reduce and planned_engine(dims, work) == "fsdp"


def layout_dict(dims: ParallelDims, work: Workload) -> dict:
    """The JSON ``layout`` of ``gptforge plan``: the planned layout and work."""
    engine = planned_engine(dims, work)
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": dims.zero_stage,
            "engine": engine, "micro_batch": work.micro_batch, "seq_len": work.seq_len,
            "recompute": dims.recompute, "recompute_every": dims.recompute_every, "precision": work.precision,
            "optimizer_offload": dims.optimizer_offload, "sequence_parallel": dims.sequence_parallel,
            "defer_grad_reduce": defers_grad_reduce(dims, work),
            "fsdp_unit": dims.fsdp_unit if engine == "fsdp" else None,
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
    sharding (FSDP2 refuses fp16); ZeRO 2/3 otherwise go to FSDP2, which also composes with tensor parallelism.
    A layout that names ``zero_engine: deepspeed`` keeps it."""
    data_parallel_only = dims.tp == 1 and dims.pp == 1
    deepspeed = (dims.zero_engine == "deepspeed" or dims.zero_stage == 1 or dims.optimizer_offload
                 or (work.precision == "fp16" and dims.zero_stage in FSDP_STAGES and data_parallel_only))
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp,
            "sequence_parallel": dims.sequence_parallel and dims.tp > 1,
            "zero_stage": dims.zero_stage, "zero_engine": "deepspeed" if deepspeed else "fsdp",
            "optimizer_offload": dims.optimizer_offload, "recompute": dims.recompute,
            "recompute_every": dims.recompute_every, "pp_schedule": "1f1b",
            "defer_grad_reduce": dims.defer_grad_reduce,
            "fsdp_unit": dims.fsdp_unit}


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
    block_linear: int
    """A block's largest linear layer (an MLP matrix and its bias): ``fsdp_unit: linear``'s largest unit."""
    block_norms: int
    """A block's LayerNorms: what ``fsdp_unit: linear`` leaves in the block's own unit."""
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
        block_linear=max(column(d, f), row(f, d), column(d, d), row(d, d)),
        block_norms=2 * layer_norm,
        final_norm=layer_norm if config.final_norm else 0,
    )


def largest_tensor(config: GPTConfig) -> int:
    """Elements of the model's largest parameter (unsharded): the token embedding, an MLP matrix or the
    position embedding."""
    d = config.d_model
    return max(config.padded_vocab_size * d, config.ffn_dim * d, config.context_length * d)


def init_block_bytes(config: GPTConfig) -> int:
    """The transient of a rank's initialisation: one fp32 row block of ``INIT_BLOCK_ELEMENTS`` elements
    (``model/gpt.py``), or one row where a row is longer (the MLP-out matrix's rows hold ``ffn_dim``)."""
    return FP32_BYTES * max(INIT_BLOCK_ELEMENTS, config.ffn_dim, config.d_model)


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


def logits_bytes(config: GPTConfig, dims: ParallelDims, work: Workload) -> int:
    """fp32 logits of one micro-batch and their gradient (vocabulary-sharded over tp)."""
    return 2 * work.micro_batch * work.seq_len * config.padded_vocab_size // dims.tp * FP32_BYTES


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
        total += logits_bytes(config, dims, work)
    return total


def deepspeed_zero_settings(config: GPTConfig, dims: ParallelDims, work: Workload) -> dict:
    """The ``zero_optimization`` values of the trainer's own DeepSpeed config for this model and layout,
    over DeepSpeed's defaults (``overlap_comm`` defaults to on for ZeRO-3 only)."""
    from .deepspeed_engine import deepspeed_config

    engine = deepspeed_config(dims=dims, d_model=config.d_model, micro_batch=work.micro_batch,
                              global_batch=work.micro_batch * dims.dp, precision=work.precision, grad_clip=1.0)
    given = engine.get("zero_optimization", {})
    defaults = DEEPSPEED_ZERO_DEFAULTS | {"overlap_comm": dims.zero_stage == 3}
    # DeepSpeed takes the ZeRO-3 keys with or without their "stage3_" prefix
    return {key: given.get(key, given.get(key.removeprefix("stage3_"), default)) for key, default in defaults.items()}


@dataclass(kw_only=True, frozen=True)
class StageShape:
    """One pipeline stage of a layout, as the peaks need it (parameter counts per tp rank)."""

    config: GPTConfig
    dims: ParallelDims
    work: Workload
    index: int
    engine: str
    """``planned_engine``."""
    params: int
    """Parameters of the stage on one tp rank."""
    block: int
    """Parameters of one block on one tp rank."""
    unit: int
    """Parameters of a block's largest FSDP unit on one tp rank (``parallel.fsdp_unit``): the block, or
    its largest linear layer with the block's LayerNorms (the block's own unit)."""
    root: int
    """The stage's parameters outside its blocks in FSDP's root unit (embeddings, final norm; without the
    position embedding, its own unit, with ``fsdp_unit: linear``)."""
    n_blocks: int

    @property
    def width(self) -> int:
        return PRECISION_BYTES[self.work.precision]

    @property
    def role(self) -> str:
        return stage_role(self.index, self.dims.pp)

    @property
    def ddp(self) -> bool:
        """Data-parallel replicas through torch DDP (a pipeline averages gradients itself)."""
        return self.engine == "replicas" and self.dims.dp > 1 and self.dims.pp == 1

    @property
    def state_params(self) -> float:
        """Parameters whose fp32 master weights and Adam moments this rank keeps (its ZeRO-1 partition)."""
        return self.params / self.dims.dp if self.dims.zero_stage >= 1 else self.params

    @property
    def defer(self) -> bool:
        return self.dims.defer_grad_reduce and self.engine == "fsdp"


def stage_shape(config: GPTConfig, dims: ParallelDims, work: Workload, index: int) -> StageShape:
    params = stage_params(config, dims, stage_role(index, dims.pp))
    counts = param_counts(config, dims.tp)
    unit = counts.block if dims.fsdp_unit == "block" else counts.block_linear + counts.block_norms
    n_blocks = config.n_layer // dims.pp
    root = params - n_blocks * counts.block
    if dims.fsdp_unit == "linear" and stage_role(index, dims.pp) in ("first", "only"):
        root -= counts.position_embedding  # gathered only at the step's two ends, not at the backward's peak
    return StageShape(config=config, dims=dims, work=work, index=index, engine=planned_engine(dims, work),
                      params=params, block=counts.block, unit=unit, root=root, n_blocks=n_blocks)


def stored_bytes(stage: StageShape) -> dict[str, float]:
    """What the rank keeps for the whole run: ``weights``, ``gradients`` (from the first backward to the
    optimizer step), ``master_weights``, ``optimizer_state`` (from the first step), ``host_bytes`` (offload)."""
    dims, width, params = stage.dims, stage.width, stage.params
    zero, dp = dims.zero_stage, dims.dp
    weights_sharded = zero == 3 or stage.engine == "fsdp"  # FSDP2 stores ZeRO-2's parameters sharded too
    if stage.work.precision != "fp32":
        master = MASTER_BYTES * stage.state_params
    elif stage.engine == "deepspeed" and zero in (1, 2):  # its fp32 partition is a copy even in fp32
        master = MASTER_BYTES * stage.state_params
    else:
        master = 0.0
    out = {
        "weights": width * params / (dp if weights_sharded else 1),
        "gradients": width * params / (dp if zero >= 2 else 1),
        "master_weights": master,
        "optimizer_state": ADAM_BYTES * stage.state_params,
        "host_bytes": 0.0,
    }
    if dims.optimizer_offload:
        out["host_bytes"] = out["master_weights"] + out["optimizer_state"]
        out["master_weights"] = out["optimizer_state"] = 0.0
    return out


def gathered_bytes(stage: StageShape, zero_settings: Mapping[str, int] | None) -> float:
    """Compute-dtype copies of sharded weights gathered during forward and backward."""
    width, zero = stage.width, stage.dims.zero_stage
    if stage.engine == "fsdp":
        if zero == 2:  # ZeRO-2: every unit stays gathered from its forward until its backward
            return width * stage.params
        units = stage.n_blocks if stage.dims.fsdp_unit == "block" else 2
        return width * (stage.root + min(2, units) * stage.unit)  # root + the unit computing + the one prefetched
    if stage.engine == "deepspeed" and zero == 3 and zero_settings is not None:
        # Parameters reused within max_reuse_distance are not released; prefetch runs a bucket ahead;
        # at most max_live_parameters are gathered at once (but the module computing is, whatever its size).
        kept = (stage.block + zero_settings["stage3_prefetch_bucket_size"]
                + zero_settings["stage3_max_reuse_distance"])
        kept = min(kept, max(zero_settings["stage3_max_live_parameters"], stage.block))
        return width * min(stage.params, kept)
    return 0.0


def unsharded_gradient_bytes(stage: StageShape) -> float:
    """FSDP's gradients before their reduce-scatter (``fsdp`` only; see the module docstring)."""
    if stage.engine != "fsdp":
        return 0.0
    width, root, block = stage.width, stage.root, stage.unit
    if stage.defer:  # every unit's unsharded gradient, then one unit's fp32 reduce-scatter input at the end
        return width * stage.params + FP32_BYTES * max(root, block)
    # The root unit's gradient stays unsharded while the blocks reduce-scatter one after the other.
    return max(width * root + (width + FP32_BYTES) * block, (width + FP32_BYTES) * root)


def comm_buffer_bytes(stage: StageShape, zero_settings: Mapping[str, int] | None, phase: str) -> float:
    """DDP's fp32 gradient buckets (and its start-up broadcast bucket), DeepSpeed's reduce buckets."""
    dims = stage.dims
    if stage.ddp:
        buckets = FP32_BYTES * stage.params  # the trainer's DDP keeps fp32 parameters and autocasts
        if phase == "startup":
            buckets += min(DDP_BROADCAST_BUCKET_BYTES, FP32_BYTES * stage.params)
        return buckets
    if stage.engine != "deepspeed" or zero_settings is None or dims.zero_stage == 0:
        return 0.0
    elements = zero_settings["reduce_bucket_size"]
    if dims.zero_stage == 3:  # allocated when the engine starts
        return stage.width * elements
    if phase == "startup":  # ZeRO-1/2 allocate theirs at the first backward
        return 0.0
    dtype = FP32_BYTES if dims.zero_stage == 1 else stage.width  # ZeRO-1 accumulates in fp32
    return dtype * elements * (2 if zero_settings["overlap_comm"] else 1)


def phase_parts(stage: StageShape) -> dict[str, dict]:
    """The three peaks of one stage: ``startup``, ``accumulation`` (with ``at``: ``backward`` or
    ``optimizer step``) and ``save`` (with ``host_staging``), each ``MEMORY_KEYS`` and ``total`` in bytes."""
    dims = stage.dims
    zero_settings = deepspeed_zero_settings(stage.config, dims, stage.work) if stage.engine == "deepspeed" else None
    stored = stored_bytes(stage)
    kept = {key: stored[key] for key in ("weights", "master_weights")}
    ds3 = stage.engine == "deepspeed" and dims.zero_stage == 3

    startup = kept | {"init_buffers": init_block_bytes(stage.config),
                      "comm_buffers": comm_buffer_bytes(stage, zero_settings, "startup")}
    if ds3:  # gradient partitions exist from initialisation; zero.Init builds each parameter whole first
        startup["gradients"] = stored["gradients"]
        startup["init_buffers"] += stage.width * largest_tensor(stage.config)
        # and the engine's optimizer set-up zero-fills a gradient buffer of the rank's fp32 partition
        # (``initialize_optimizer_states`` in deepspeed/runtime/zero/stage3.py), freed before training
        startup["init_buffers"] += FP32_BYTES * stage.state_params

    training = kept | {key: stored[key] for key in ("gradients", "optimizer_state")}
    buckets = comm_buffer_bytes(stage, zero_settings, "accumulation")
    backward = training | {
        "activations": stage_activation_bytes(stage.config, dims, stage.work, stage.index),
        "gather_buffers": gathered_bytes(stage, zero_settings),
        "unsharded_gradients": unsharded_gradient_bytes(stage),
        "comm_buffers": buckets,
    }
    moment = 0.0 if dims.optimizer_offload else FP32_BYTES * stage.state_params
    if stage.engine == "deepspeed" and not dims.optimizer_offload:
        # AdamW steps the flat fp32 partition as one tensor: sqrt(v) and its quotient, two temporaries of
        # the partition's size at once (torch/optim/adam.py, single-tensor path); ZeRO-3 also flattens
        # the partition's gradients into a new fp32 tensor first (``_prepare_fp32_grad_for_sub_group``)
        moment *= 3 if ds3 else 2
    step = training | {"optimizer_temporaries": moment, "comm_buffers": buckets,
                       "gather_buffers": gathered_bytes(stage, zero_settings) if ds3 else 0.0}

    save = kept | {"optimizer_state": stored["optimizer_state"], "comm_buffers": buckets}
    if stage.engine == "deepspeed":  # its gradient partitions and kept ZeRO-3 parameters persist
        save |= {"gradients": stored["gradients"] if dims.zero_stage >= 2 else 0.0,
                 "gather_buffers": step["gather_buffers"]}

    def total(parts: dict) -> dict:
        out = {key: int(round(parts.get(key, 0.0))) for key in MEMORY_KEYS}
        return out | {"total": sum(out.values())}

    backward_total, step_total = total(backward), total(step)
    accumulation = (backward_total | {"at": "backward"} if backward_total["total"] >= step_total["total"]
                    else step_total | {"at": "optimizer step"})
    staging = CHECKPOINT_BYTES * stage.state_params
    return {"startup": total(startup), "accumulation": accumulation,
            "save": total(save) | {"host_staging": int(round(staging))}}


def stage_memory(config: GPTConfig, dims: ParallelDims, work: Workload, index: int) -> dict:
    """Bytes of pipeline stage ``index``: ``peaks`` (``phase_parts``), ``total`` (the largest device peak),
    ``peak_phase`` and its ``MEMORY_KEYS``, ``host_bytes`` (offload), ``params``, ``index``, ``role``."""
    stage = stage_shape(config, dims, work, index)
    peaks = phase_parts(stage)
    phase = max(PHASES, key=lambda name: peaks[name]["total"])
    out: dict = {key: peaks[phase][key] for key in (*MEMORY_KEYS, "total")}
    out |= {"peak_phase": phase, "peaks": peaks, "host_bytes": int(round(stored_bytes(stage)["host_bytes"])),
            "params": stage.params, "index": index, "role": stage.role}
    return out


def plan_memory(config: GPTConfig, dims: ParallelDims, work: Workload) -> dict:
    """Bytes per GPU of ``work`` under ``dims`` at the three peaks (rules in this module's docstring).

    Keys: ``peaks`` (per phase of ``PHASES``: the breakdown ``MEMORY_KEYS`` and ``total`` of the stage with
    the largest such peak, its ``stage``; ``accumulation`` says ``at`` backward or optimizer step, ``save``
    adds ``host_staging``, host memory), ``total`` (the largest device peak, what ``fits`` is given),
    ``peak_phase`` and that peak's ``MEMORY_KEYS``; ``host_bytes`` (offloaded optimizer), ``save_host_bytes``
    (the largest save staging), ``engine``, ``n_params`` (the whole model), ``params_per_rank`` (weights
    stored on the GPU), ``model_parallel_params`` (the largest stage's parameters on one tp rank, which its
    gradients and optimizer state cover before ZeRO), ``stage`` and ``stage_role`` (the stage of the largest
    peak), ``stages`` (every stage's ``stage_memory``).
    Raises ValueError when the layout does not fit the model's shape."""
    errors = shape_errors(config, dims, work)
    if errors:
        raise ValueError("; ".join(errors))
    stages = [stage_memory(config, dims, work, index) for index in range(dims.pp)]
    peaks = {}
    for phase in PHASES:
        largest = max(stages, key=lambda stage: stage["peaks"][phase]["total"])
        peaks[phase] = largest["peaks"][phase] | {"stage": largest["index"]}
    worst = max(stages, key=lambda stage: stage["total"])
    params = worst["params"]
    result = {key: worst[key] for key in (*MEMORY_KEYS, "total", "peak_phase", "host_bytes")}
    result |= {
        "peaks": peaks,
        "save_host_bytes": peaks["save"]["host_staging"],
        "engine": planned_engine(dims, work),
        "n_params": param_counts(config).total(config.n_layer),
        "params_per_rank": (int(round(params / dims.dp)) if dims.zero_stage == 3 or planned_engine(dims, work) == "fsdp"
                            else params),
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


def fit_errors(memory: dict, gpu_memory_gib: float, margin: float = SAFETY_MARGIN) -> list[str]:
    """One message per peak of ``plan_memory``'s result that does not fit ``gpu_memory_gib`` (empty: all
    fit), naming the phase, its stage and its largest parts."""
    limit = (1.0 - margin) * gpu_memory_gib * GIB
    errors = []
    for phase in PHASES:
        peak = memory["peaks"][phase]
        if not fits(peak["total"], gpu_memory_gib, margin):
            largest = sorted((key for key in MEMORY_KEYS if peak[key]), key=lambda key: -peak[key])[:3]
            parts = ", ".join(f"{KEY_LABELS[key]} {peak[key] / GIB:.1f}" for key in largest)
            errors.append(f"{PHASE_LABELS[phase]} peak {peak['total'] / GIB:.1f} GiB (stage {peak['stage']}: "
                          f"{parts} GiB) exceeds {limit / GIB:.1f} GiB ({1 - margin:.0%} of {gpu_memory_gib:g} GiB)")
    return errors
