"""Predicted step time of a parallel layout (``gptforge plan --time``): compute, tensor-parallel
collectives, pipeline bubble and send/recv, data-parallel gathers and reductions, the optimizer step.

Every term is bytes or FLOPs over a rate of the ``Machine``, times a stated efficiency:

- **compute**: the rank's training FLOPs (6N + 12·L·d·T per token, PaLM appendix B; its share of N under
  tp and pp; a recomputed block's forward once more, +1/3 of its FLOPs) over ``peak_flops x
  matmul_efficiency``.
- **tensor parallelism**: per block and micro-batch, two all-reduces of the [b, s, d] activations forward
  and two backward (Megatron's f/g; with sequence parallelism an all-gather and a reduce-scatter each,
  the same bytes), two more forward for a recomputed block; a ring all-reduce moves 2(tp-1)/tp of the
  bytes over the slowest link of the group. On the critical path: not overlapped.
- **pipeline**: the 1F1B bubble, (pp-1)/(m·v) of the stage's compute for m micro-batches and v virtual
  stages (Narayanan et al. 2021, section 2.2), plus each micro-batch's hidden state sent forward and its
  gradient back (fp32 on the wire in ``parallel/pipeline.py``), not overlapped.
- **data parallelism**: DDP all-reduces fp32 gradients once per step, overlapped with the last
  micro-batch's backward; pipeline replicas after the schedule (bucketed, not overlapped); FSDP gathers
  16-bit (compute dtype) parameters for each forward (ZeRO-2) or forward and backward (ZeRO-3) and
  reduce-scatters fp32 gradients after each micro-batch (after the last with ``defer_grad_reduce``),
  prefetched, so they overlap compute: the step takes the longer of the two.
- **optimizer**: AdamW reads and writes each fp32 parameter, both moments and the gradient: 28 bytes per
  locally held parameter over ``hbm x memory_efficiency``.

Links: tp ranks are innermost, then dp, then pp (``ParallelDims.build_mesh``), so a group stays inside a
node (``intra_node``: NVLink) while the ranks it spans fit in ``gpus_per_node``, else crosses
``inter_node`` (InfiniBand, per GPU). Each collective also pays ``latency`` per ring step.

What it leaves out: kernel launch gaps, the non-matmul work (LayerNorm, GELU, softmax, residual adds:
memory-bound, folded into ``matmul_efficiency``), stragglers, and the overlap FSDP loses at its first
and last unit. ``bench/time_model.py`` checks it against measured step times (``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..common.hardware import DeviceSpec
from ..model.config import GPTConfig
from ..model.flops import count_parameters, flops_per_token
from .dims import ParallelDims
from .planner import Workload, checkpointed_blocks, stage_params, stage_role


@dataclass(frozen=True, kw_only=True)
class Machine:
    """The rates a step's time is made of, per device."""

    name: str
    peak_flops: float
    """Dense peak FLOP/s of one device in the precision in use."""
    hbm: float
    """Memory bandwidth, bytes/s."""
    intra_node: float
    """Per-GPU bandwidth to the GPUs of its node, one direction, bytes/s (NVLink)."""
    inter_node: float
    """Per-GPU bandwidth to other nodes, one direction, bytes/s (InfiniBand)."""
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.7
    """Achieved fraction of ``peak_flops`` over the step's compute (large bf16 GEMMs reach about 0.75-0.8
    of the datasheet on H100; the non-matmul work takes the rest)."""
    link_efficiency: float = 0.8
    """Achieved fraction of a link's bandwidth in a collective (NCCL's bus bandwidth)."""
    memory_efficiency: float = 0.8
    """Achieved fraction of ``hbm`` in the optimizer's streaming kernels."""
    latency: float = 10e-6
    """Seconds per step of a ring collective and per send/recv."""

    @classmethod
    def from_device(cls, spec: DeviceSpec, precision: str, *, inter_node_gbps: float = 400.0,
                    gpus_per_node: int = 8, **factors) -> Machine:
        """A node of ``spec`` GPUs (peak of ``precision``) with one ``inter_node_gbps`` NIC per GPU."""
        intra = spec.nvlink or spec.pcie
        return cls(name=spec.part, peak_flops=spec.peak(precision), hbm=spec.hbm, intra_node=intra,
                   inter_node=inter_node_gbps * 1e9 / 8, gpus_per_node=gpus_per_node, **factors)


@dataclass(frozen=True, kw_only=True)
class StepTime:
    compute_s: float
    tp_comm_s: float
    pp_bubble_s: float
    pp_p2p_s: float
    dp_comm_s: float
    """All of the data-parallel traffic's time."""
    dp_exposed_s: float
    """The part of it that compute does not hide."""
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    """Whole job."""
    mfu_6n: float
    mfu_6n_attn: float

    def as_dict(self) -> dict:
        return asdict(self)


def _link(machine: Machine, ranks_spanned: int) -> float:
    """Bandwidth of a group whose ranks span ``ranks_spanned`` consecutive ranks."""
    bw = machine.intra_node if ranks_spanned <= machine.gpus_per_node else machine.inter_node
    return bw * machine.link_efficiency


def ring_all_reduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer in 2(n-1) steps."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def ring_gather_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """An all-gather or reduce-scatter of a ``nbytes`` whole: (n-1)/n of it per rank in n-1 steps."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / bandwidth + (ranks - 1) * latency


def step_time(config: GPTConfig, dims: ParallelDims, work: Workload, global_batch: int,
              machine: Machine) -> StepTime:
    """The predicted time of one optimizer step of ``global_batch`` sequences (the largest stage's)."""
    tp, pp, dp = dims.tp, dims.pp, dims.dp
    seq, micro = work.seq_len, work.micro_batch
    if global_batch % (dp * micro):
        raise ValueError(f"global batch {global_batch} is not a multiple of dp x micro batch ({dp} x {micro})")
    n_micro = global_batch // (dp * micro)
    act_bytes = 4 if work.precision == "fp32" else 2
    counts = count_parameters(config)
    n_flops = counts["total"] - counts["position_embedding"]
    fpt = {key: flops_per_token(config, seq, n_flops, key) for key in ("6n", "6n_attn")}
    blocks = config.n_layer // pp
    recomputed = max(checkpointed_blocks(dims, s * blocks, blocks) for s in range(pp))

    # compute: the rank's share of the model's FLOPs, plus a recomputed block's forward again
    block_share = 12 * config.d_model ** 2 * config.n_layer / max(n_flops, 1)  # blocks' part of 6N's N
    recompute_factor = 1 + block_share * (recomputed / blocks) / 3 if blocks else 1
    rank_tokens = global_batch // dp * seq
    compute = rank_tokens * fpt["6n_attn"] / (tp * pp) * recompute_factor / (machine.peak_flops * machine.matmul_efficiency)

    # tensor parallelism: 4 all-reduces of [b, s, d] per block and micro-batch (+2 per recomputed block)
    tp_bw = _link(machine, tp)
    activation = micro * seq * config.d_model * act_bytes
    per_collective = ring_all_reduce_s(activation, tp, tp_bw, machine.latency)
    tp_comm = n_micro * (4 * blocks + 2 * recomputed) * per_collective

    # pipeline: bubble and the hidden states sent between stages (fp32 on the wire)
    virtual = dims.virtual_stages if dims.pp_schedule == "interleaved-1f1b" else 1
    bubble = (pp - 1) / (n_micro * virtual) * (compute + tp_comm) if pp > 1 else 0.0
    hidden = micro * (seq // tp if dims.sequence_parallel and tp > 1 else seq) * config.d_model * 4
    pp_bw = _link(machine, tp * dp * pp)
    p2p = 2 * n_micro * virtual * (hidden / pp_bw + machine.latency) if pp > 1 else 0.0

    # data parallelism over the largest stage's parameters (per tp rank)
    params = max(stage_params(config, dims, stage_role(s, pp)) for s in range(pp))
    dp_bw = _link(machine, tp * dp)
    if dp == 1:
        dp_comm = exposed = 0.0
    elif dims.fsdp or (dims.deepspeed and dims.zero_stage == 3):
        gathers = 2 if dims.zero_stage == 3 else 1
        reductions = 1 if dims.defer_grad_reduce else n_micro
        param_bytes = params * act_bytes
        dp_comm = (n_micro * gathers * ring_gather_s(param_bytes, dp, dp_bw, machine.latency)
                   + reductions * ring_gather_s(params * 4, dp, dp_bw, machine.latency))
        exposed = max(0.0, dp_comm - compute)
    else:  # DDP, pipeline replicas, DeepSpeed ZeRO-1/2: gradients reduced once per step
        dp_comm = ring_all_reduce_s(params * 4, dp, dp_bw, machine.latency)
        if pp > 1:
            exposed = dp_comm  # after the schedule (parallel/pipeline.py average_over_dp)
        else:  # overlapped with the backward of the last micro-batch (2/3 of its compute)
            exposed = max(0.0, dp_comm - compute / n_micro * 2 / 3)

    # optimizer: 28 bytes of fp32 traffic per locally held parameter
    local_params = params / (dp if dims.fsdp or dims.deepspeed else 1)
    optimizer = local_params * 28 / (machine.hbm * machine.memory_efficiency)

    step = compute + tp_comm + bubble + p2p + exposed + optimizer
    tokens_per_s = global_batch * seq / step
    world = tp * pp * dp
    mfu = {key: value * tokens_per_s / (machine.peak_flops * world) for key, value in fpt.items()}
    return StepTime(compute_s=compute, tp_comm_s=tp_comm, pp_bubble_s=bubble, pp_p2p_s=p2p, dp_comm_s=dp_comm,
                    dp_exposed_s=exposed, optimizer_s=optimizer, step_s=step, tokens_per_s=tokens_per_s,
                    mfu_6n=mfu["6n"], mfu_6n_attn=mfu["6n_attn"])

