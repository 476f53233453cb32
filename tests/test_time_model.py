"""The step-time model of ``gptforge plan --time`` (parallel/timing.py) on cases worked by hand."""

from __future__ import annotations

import pytest

from gptforge.model.flops import count_parameters, flops_per_token
from gptforge.model.presets import PRESETS
from gptforge.parallel.config import ParallelConfig
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.planner import Workload, stage_params, stage_role
from gptforge.parallel.timing import Machine, ring_all_reduce_s, ring_gather_s, step_time

pytestmark = pytest.mark.unit

# round numbers, so each term can be written out: 100 TFLOP/s at 50 %, 100 GB/s links at 100 %
MACHINE = Machine(name="test", peak_flops=100e12, hbm=1e12, intra_node=100e9, inter_node=10e9, gpus_per_node=8,
                  matmul_efficiency=0.5, link_efficiency=1.0, memory_efficiency=1.0, latency=0.0)
CONFIG = PRESETS["gpt3-125m"].config()
SEQ, MICRO = 2048, 4


def dims(world: int, **parallel) -> ParallelDims:
    errors: list[str] = []
    out = ParallelDims.from_config(ParallelConfig(**parallel), world, errors)
    assert not errors, errors
    return out


def fpt(convention="6n_attn") -> float:
    counts = count_parameters(CONFIG)
    return flops_per_token(CONFIG, SEQ, counts["total"] - counts["position_embedding"], convention)


def test_one_gpu_is_compute_plus_the_optimizer():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    t = step_time(CONFIG, dims(1), work, 8, MACHINE)
    compute = 8 * SEQ * fpt() / (100e12 * 0.5)
    optimizer = stage_params(CONFIG, dims(1), "only") * 28 / 1e12
    assert t.compute_s == pytest.approx(compute) and t.optimizer_s == pytest.approx(optimizer)
    assert t.tp_comm_s == t.pp_bubble_s == t.pp_p2p_s == t.dp_comm_s == 0
    assert t.step_s == pytest.approx(compute + optimizer)
    assert t.tokens_per_s == pytest.approx(8 * SEQ / t.step_s)
    # MFU in both conventions, against the one device's peak
    assert t.mfu_6n_attn == pytest.approx(fpt() * t.tokens_per_s / 100e12)
    assert t.mfu_6n == pytest.approx(fpt("6n") * t.tokens_per_s / 100e12)
    assert t.mfu_6n_attn < 0.5  # never above the matmul efficiency


def test_ring_collectives():
    assert ring_all_reduce_s(1e9, 4, 100e9, 1e-5) == pytest.approx(2 * 3 / 4 * 1e-2 + 6e-5)
    assert ring_gather_s(1e9, 4, 100e9, 1e-5) == pytest.approx(3 / 4 * 1e-2 + 3e-5)
    assert ring_all_reduce_s(1e9, 1, 100e9, 1e-5) == ring_gather_s(1e9, 1, 100e9, 1e-5) == 0


def test_ddp_all_reduce_hides_behind_the_last_backward():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    t = step_time(CONFIG, dims(2, dp=2), work, 16, MACHINE)  # 2 micro-batches per rank
    grads = stage_params(CONFIG, dims(2, dp=2), "only") * 4
    assert t.dp_comm_s == pytest.approx(grads / 100e9)  # 2 (n-1)/n = 1 for n = 2
    assert t.dp_exposed_s == pytest.approx(max(0.0, t.dp_comm_s - t.compute_s / 2 * 2 / 3))
    slow = Machine(**{**MACHINE.__dict__, "intra_node": 1e9})  # a slow link: the reduction shows
    assert step_time(CONFIG, dims(2, dp=2), work, 16, slow).dp_exposed_s > 0


def test_tensor_parallel_collectives_and_the_link_they_use():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    t = step_time(CONFIG, dims(2, tp=2), work, 8, MACHINE)
    activation = MICRO * SEQ * CONFIG.d_model * 2
    assert t.tp_comm_s == pytest.approx(2 * 4 * CONFIG.n_layer * activation / 100e9)  # 2 micro x 4 per block
    assert t.compute_s == pytest.approx(step_time(CONFIG, dims(1), work, 8, MACHINE).compute_s / 2)
    # tp 16 spans two nodes of 8: its all-reduces run at the inter-node rate
    wide = step_time(CONFIG, dims(16, tp=16), Workload(seq_len=SEQ, micro_batch=MICRO), 8, MACHINE)
    assert wide.tp_comm_s == pytest.approx(2 * 4 * CONFIG.n_layer * 2 * 15 / 16 * activation / 10e9)


def test_recompute_adds_a_forward_and_its_collectives():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    plain = step_time(CONFIG, dims(2, tp=2), work, 8, MACHINE)
    full = step_time(CONFIG, dims(2, tp=2, recompute="full"), work, 8, MACHINE)
    assert full.tp_comm_s == pytest.approx(plain.tp_comm_s * 6 / 4)
    assert plain.compute_s < full.compute_s < plain.compute_s * 4 / 3


def test_pipeline_bubble_and_sends():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    t = step_time(CONFIG, dims(2, pp=2), work, 32, MACHINE)  # 8 micro-batches
    assert t.pp_bubble_s == pytest.approx((2 - 1) / 8 * (t.compute_s + t.tp_comm_s))
    assert t.pp_p2p_s == pytest.approx(2 * 8 * MICRO * SEQ * CONFIG.d_model * 4 / 100e9)
    interleaved = step_time(CONFIG, dims(2, pp=2, pp_schedule="interleaved-1f1b", virtual_stages=2), work, 32,
                            MACHINE)
    assert interleaved.pp_bubble_s == pytest.approx(t.pp_bubble_s / 2)
    # the largest stage's parameters are what its replicas reduce
    replicas = step_time(CONFIG, dims(4, pp=2, dp=2), work, 32, MACHINE)
    biggest = max(stage_params(CONFIG, dims(4, pp=2, dp=2), stage_role(s, 2)) for s in range(2))
    assert replicas.dp_exposed_s == replicas.dp_comm_s == pytest.approx(biggest * 4 / 100e9)


def test_fsdp_traffic_per_micro_batch_overlaps_compute():
    work = Workload(seq_len=SEQ, micro_batch=MICRO, precision="bf16")
    params = stage_params(CONFIG, dims(8, dp=8, zero_stage=3), "only")
    z3 = step_time(CONFIG, dims(8, dp=8, zero_stage=3), work, 64, MACHINE)  # 2 micro-batches per rank
    per_micro = 2 * 7 / 8 * params * 2 / 100e9 + 7 / 8 * params * 4 / 100e9  # 2 gathers (bf16), 1 reduce-scatter (fp32)
    assert z3.dp_comm_s == pytest.approx(2 * per_micro)
    assert z3.dp_exposed_s == pytest.approx(max(0.0, z3.dp_comm_s - z3.compute_s))
    z2 = step_time(CONFIG, dims(8, dp=8, zero_stage=2), work, 64, MACHINE)
    assert z2.dp_comm_s == pytest.approx(2 * (7 / 8 * params * 2 / 100e9 + 7 / 8 * params * 4 / 100e9))
    assert z3.optimizer_s == pytest.approx(params / 8 * 28 / 1e12)  # each rank steps its shard


def test_plan_time_ranks_proposals_by_predicted_throughput():
    from gptforge.parallel.plan_cli import propose_rows

    (row,) = propose_rows(["gpt3-1.3b"], n_gpus=16, gpus_per_node=8, micro_batch=2, seq_len=None, precision="bf16",
                          gpu_memory_gib=80, zero_stages=None, recompute=None, recompute_every=2,
                          optimizer_offload=False, sequence_parallel=True, global_batch=None, top=50,
                          machine=MACHINE)
    speeds = [layout["time"]["tokens_per_s"] for layout in row["layouts"]]
    assert len(speeds) > 3 and speeds == sorted(speeds, reverse=True)
    assert all(layout["time"]["global_batch"] % (layout["layout"]["dp"] * 2) == 0 for layout in row["layouts"])


def test_plan_time_flags():
    import argparse

    from gptforge.common.errors import UserError
    from gptforge.parallel.plan_cli import add_arguments, machine_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parse = lambda *a: parser.parse_args(["--preset", "gpt3-125m", *a])  # noqa: E731
    assert machine_from_args(parse()) is None
    h200 = machine_from_args(parse("--time", "--device", "NVIDIA H200"))
    assert h200.peak_flops == 989.4e12 and h200.hbm == 4.8e12 and h200.inter_node == 50e9
    tf32 = machine_from_args(parse("--time", "--device", "a100", "--precision", "fp32"))
    assert tf32.peak_flops == 156e12  # fp32 matmuls run as TF32
    with pytest.raises(UserError, match="--device 'h300': not a known GPU"):
        machine_from_args(parse("--time", "--device", "h300"))
    with pytest.raises(UserError, match="--matmul-efficiency must be in"):
        machine_from_args(parse("--time", "--matmul-efficiency", "1.5"))
