"""The memory planner (parallel/planner.py): its weights per rank against the trainer's real sharding on a fake
process group, its rules one by one, its three peaks on hand-computed cases, and ``gptforge plan`` with layout
flags. (The peaks against real runs: tests/test_planner_measured.py and bench/memory.py.)"""

import json
import subprocess

import pytest

from gptforge.launcher.cli import main as cli_main
from gptforge.model.flops import count_parameters
from gptforge.model.presets import PRESETS, get_preset
from gptforge.parallel.fake_mesh import Measurement, measure_in_subprocess
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.planner import (
    GIB,
    MEMORY_KEYS,
    PHASES,
    Workload,
    deepspeed_zero_settings,
    fit_errors,
    fits,
    gathered_bytes,
    param_counts,
    plan_memory,
    shape_errors,
    stage_activation_bytes,
    stage_shape,
    trainer_gaps,
    trainer_settings,
)
from gptforge.parallel.propose import layout_cost, propose_layouts

from helpers.launch import GPTFORGE

SEQ = 2048
# (preset, tp, pp, dp, zero stage, precision). dp x tp ranks per stage, up to 1024 in one fake process group.
FAKE_PG_CASES = [
    ("gpt3-175b", 8, 16, 8, 3, "bf16"),
    ("gpt3-175b", 8, 16, 8, 1, "bf16"),
    ("gpt3-175b", 8, 1, 128, 3, "bf16"),  # a 1024-rank fake process group
    ("gpt3-13b", 4, 4, 8, 3, "bf16"),
    ("gpt3-13b", 4, 4, 8, 2, "bf16"),
    ("gpt3-6.7b", 8, 1, 16, 3, "fp32"),
    ("gpt3-2.7b", 8, 4, 32, 3, "bf16"),
    ("gpt3-1.3b", 2, 1, 4, 3, "bf16"),
    ("gpt3-1.3b", 2, 1, 4, 0, "bf16"),
    ("gpt3-760m", 8, 3, 4, 3, "bf16"),  # three stages: first, middle, last
    ("gpt3-350m", 4, 2, 2, 3, "fp16"),
    ("gpt3-125m", 1, 1, 8, 3, "bf16"),
    ("gpt3-125m", 1, 1, 8, 1, "bf16"),
    ("gpt1", 4, 1, 2, 3, "bf16"),  # post-LN, no final LayerNorm
]


def layout_of(tp, pp, dp, zero, precision="bf16", *, seq_len=SEQ, micro_batch=1, sequence_parallel=True,
              **kw) -> tuple[ParallelDims, Workload]:
    """A planned layout and its work (the planner's default: sequence parallelism on)."""
    return (ParallelDims(tp=tp, pp=pp, dp=dp, zero_stage=zero, sequence_parallel=sequence_parallel, **kw),
            Workload(seq_len=seq_len, micro_batch=micro_batch, precision=precision))


@pytest.fixture(scope="module")
def measured() -> list[dict[str, int]]:
    """Rank 0's local parameter bytes per stage role, every case in one child process (one fake PG each)."""
    requests = [Measurement(model=get_preset(name).config().to_dict(), tp=tp, pp=pp, dp=dp, zero_stage=zero,
                            precision=precision)
                for name, tp, pp, dp, zero, precision in FAKE_PG_CASES]
    return measure_in_subprocess(requests)


@pytest.mark.parametrize("index", range(len(FAKE_PG_CASES)),
                         ids=["{}-tp{}-pp{}-dp{}-zero{}-{}".format(*case) for case in FAKE_PG_CASES])
def test_weights_per_rank_match_fake_process_group(measured, index):
    name, tp, pp, dp, zero, precision = FAKE_PG_CASES[index]
    config = get_preset(name).config()
    dims, work = layout_of(tp, pp, dp, zero, precision, seq_len=min(SEQ, config.context_length))
    plan = plan_memory(config, dims, work)
    planned = {}
    for stage in plan["stages"]:
        # middle stages all hold the same weights; the fake group applies FSDP2 for ZeRO-3 only, so for ZeRO-2
        # it measures the unsharded stage, which is the copy FSDP2 gathers from forward until backward
        shape = stage_shape(config, dims, work, stage["index"])
        planned.setdefault(stage["role"], gathered_bytes(shape, None) if zero == 2 else stage["weights"])
    got = measured[index]
    assert set(got) == set(planned)
    for role, nbytes in got.items():
        assert planned[role] == pytest.approx(nbytes, rel=0.05), role
        if zero < 3:  # tensor-parallel shards only: nothing is padded, the counts agree exactly
            assert planned[role] == nbytes, role
    worst = max(got.values())
    assert plan["weights"] <= worst * 1.05  # the reported stage is no larger than the largest real one


def test_param_counts_match_the_model():
    for name in ("gpt1", "gpt2-124m", "tiny", *[n for n in PRESETS if n.startswith("gpt3-")]):
        config = get_preset(name).config()
        assert param_counts(config).total(config.n_layer) == count_parameters(config)["total"], name
    config = get_preset("tiny").config(bias=False)
    assert param_counts(config).total(config.n_layer) == count_parameters(config)["total"]


def test_tensor_parallel_divides_matrices_not_layernorms_or_row_biases():
    config = get_preset("gpt3-125m").config()
    d, f = 768, 3072
    tp4 = param_counts(config, 4)
    # matrices and column-parallel biases / 4; two LayerNorms (weight + bias) and two row-parallel biases whole
    assert tp4.block == (4 * d * d + 2 * d * f) // 4 + (3 * d + f) // 4 + 2 * 2 * d + 2 * d
    assert tp4.token_embedding == 50304 // 4 * d
    assert tp4.position_embedding == 2048 * d  # replicated
    assert tp4.final_norm == 2 * d


def test_pipeline_stages_hold_their_blocks_and_embeddings():
    config = get_preset("gpt3-13b").config()
    one = param_counts(config, 4)
    dims, work = layout_of(4, 4, 8, 1)
    plan = plan_memory(config, dims, work)
    roles = [s["role"] for s in plan["stages"]]
    assert roles == ["first", "middle", "middle", "last"]
    first, middle, last = plan["stages"][0], plan["stages"][1], plan["stages"][3]
    assert first["params"] == one.token_embedding + one.position_embedding + 10 * one.block
    assert middle["params"] == 10 * one.block
    assert last["params"] == one.token_embedding + 10 * one.block + one.final_norm  # tied embedding copy
    assert plan["stage_role"] == "first" and plan["total"] == max(s["total"] for s in plan["stages"])
    assert plan["weights"] == first["params"] * 2
    # 1F1B (Korthikanti 4.2.1): the first stage holds n_layer blocks' worth of one micro-batch whatever pp is,
    # the last stage one micro-batch of its own blocks plus the fp32 logits and their gradient.
    block = 34 * SEQ * 5120 // 4
    logits = 2 * SEQ * config.padded_vocab_size // 4 * 4
    assert first["peaks"]["accumulation"]["at"] == "backward"
    assert first["peaks"]["accumulation"]["activations"] == 40 * block
    assert last["peaks"]["accumulation"]["activations"] == 10 * block + logits
    assert stage_activation_bytes(config, *layout_of(4, 1, 32, 1), 0) == 40 * block + logits
    # each peak is reported for its own largest stage
    for phase in PHASES:
        assert plan["peaks"][phase]["total"] == max(s["peaks"][phase]["total"] for s in plan["stages"])


def test_zero_stages_shard_what_they_should():
    config = get_preset("gpt3-1.3b").config()
    plans = [plan_memory(config, *layout_of(2, 1, 8, zero)) for zero in range(4)]
    save = [p["peaks"]["save"] for p in plans]
    acc = [p["peaks"]["accumulation"] for p in plans]
    n = plans[0]["model_parallel_params"]
    assert [p["engine"] for p in plans] == ["replicas", "deepspeed", "fsdp", "fsdp"]
    assert (save[0]["weights"], acc[0]["gradients"], save[0]["master_weights"], save[0]["optimizer_state"]) \
        == (2 * n, 2 * n, 4 * n, 8 * n)
    assert save[1]["master_weights"] == 4 * n // 8 and save[1]["optimizer_state"] == 8 * n // 8
    assert acc[1]["gradients"] == 2 * n and acc[2]["gradients"] == 2 * n // 8
    assert save[1]["weights"] == 2 * n
    # FSDP2 stores ZeRO-2's parameters sharded too; what stays whole is the copy gathered for compute
    assert save[2]["weights"] == save[3]["weights"] == 2 * n // 8
    assert plans[3]["params_per_rank"] == plans[2]["params_per_rank"] == n // 8
    assert plans[1]["params_per_rank"] == n
    assert acc[2]["gather_buffers"] == 2 * n > acc[3]["gather_buffers"] > 0 == acc[0]["gather_buffers"]
    # where the backward is the larger peak, its activations are the same whatever ZeRO shards
    assert acc[2]["at"] == acc[3]["at"] == "backward"
    assert len({a["activations"] for a in acc if a["at"] == "backward"}) == 1
    # gradients are freed by the optimizer step, before a checkpoint is saved
    assert [s["gradients"] for s in save] == [0, 0, 0, 0]
    accumulation = [a["total"] for a in acc]
    assert accumulation[0] > accumulation[2] > accumulation[3] and accumulation[0] > 3 * accumulation[3]
    offload = plan_memory(config, *layout_of(2, 1, 8, 1, optimizer_offload=True))
    off = offload["peaks"]["accumulation"]
    assert off["master_weights"] == off["optimizer_state"] == off["optimizer_temporaries"] == 0
    assert offload["host_bytes"] == save[1]["master_weights"] + save[1]["optimizer_state"]


def test_recompute_sequence_parallel_and_precision_change_activations():
    config = get_preset("gpt3-125m").config()  # 12 blocks, d 768
    sbh = SEQ * 768
    logits = 2 * SEQ * config.padded_vocab_size * 4

    def act(tp=1, precision="bf16", **kw) -> int:
        return stage_activation_bytes(config, *layout_of(tp, 1, 1, 0, precision, **kw), 0) - logits // tp

    none, full, selective = act(), act(recompute="full"), act(recompute="selective")
    assert none == 12 * 34 * sbh
    assert full == 12 * 2 * sbh + 34 * sbh  # block inputs + the block being recomputed
    assert selective == 6 * 2 * sbh + 6 * 34 * sbh + 34 * sbh  # blocks 0, 2, 4, ... checkpointed
    assert act(recompute="selective", recompute_every=3) == 4 * 2 * sbh + 8 * 34 * sbh + 34 * sbh
    assert act(4) == 12 * 34 * sbh // 4
    assert act(4, sequence_parallel=False) == 12 * sbh * (10 + 24 // 4)
    assert act(4, recompute="full") == 12 * 2 * sbh // 4 + 34 * sbh // 4
    assert act(precision="fp32") == 2 * none
    fp32 = plan_memory(config, *layout_of(1, 1, 1, 0, "fp32"))["peaks"]["save"]
    bf16 = plan_memory(config, *layout_of(1, 1, 1, 0))["peaks"]["save"]
    assert fp32["weights"] == 2 * bf16["weights"] and fp32["master_weights"] == 0


# The bench's shape (bench/memory.py): GPT-3 125M with a 2,048-token vocabulary, fp32, seq 64, micro batch 1.
# d 768, FFN 3072, 12 blocks, context 2048. One block: 2 LayerNorms 2 x 1536, q/k/v/out 4 x (768^2 + 768),
# MLP (768 x 3072 + 3072) + (3072 x 768 + 768): 7,087,872. Token and position embeddings 1,572,864 each,
# final norm 1,536: 88,201,728 parameters; the root unit (all but the blocks) 3,147,264.
BENCH_PARAMS, BENCH_BLOCK, BENCH_ROOT = 88_201_728, 7_087_872, 3_147_264


def bench_plan(**layout) -> dict:
    config = get_preset("gpt3-125m").config(vocab_size=2048)
    return plan_memory(config, ParallelDims(**layout), Workload(seq_len=64, micro_batch=1, precision="fp32"))


def test_peaks_of_fsdp_zero3_dp8_by_hand():
    plan = bench_plan(dp=8, zero_stage=3)
    assert plan["n_params"] == BENCH_PARAMS and plan["engine"] == "fsdp"
    shard = BENCH_PARAMS // 8  # 11,025,216 parameters per rank
    startup, acc, save = (plan["peaks"][phase] for phase in PHASES)
    # start-up: the fp32 shard and one 2^18-element fp32 init block; Adam's moments come at the first step
    assert (startup["weights"], startup["init_buffers"], startup["optimizer_state"]) == (4 * shard, 2**20, 0)
    assert startup["total"] == 44_100_864 + 1_048_576
    # accumulation: shards of weights, gradients and Adam; root + two blocks gathered; the root's unsharded
    # gradient + one block's and its fp32 reduce-scatter input; activations 12 x 34 s h x 2 (fp32) + logits
    assert (acc["weights"], acc["gradients"], acc["optimizer_state"]) == (44_100_864, 44_100_864, 88_201_728)
    assert acc["gather_buffers"] == 4 * (BENCH_ROOT + 2 * BENCH_BLOCK) == 69_292_032
    assert acc["unsharded_gradients"] == 4 * BENCH_ROOT + 8 * BENCH_BLOCK == 69_292_032
    assert acc["activations"] == 12 * 34 * 64 * 768 * 2 + 2 * 64 * 2048 * 4 == 41_156_608
    assert acc["at"] == "backward" and acc["total"] == 356_144_128 and plan["total"] == 356_144_128
    assert plan["peak_phase"] == "accumulation"
    # save: no gradients; the asynchronous save stages fp32 weights and both moments of the shard in host memory
    assert (save["total"], save["host_staging"]) == (132_302_592, 12 * shard)
    assert sum(save[key] for key in MEMORY_KEYS) == save["total"]


def test_linear_fsdp_units_hold_two_mlp_matrices_instead_of_two_blocks():
    block, linear = bench_plan(dp=8, zero_stage=3), bench_plan(dp=8, zero_stage=3, fsdp_unit="linear")
    unit = 768 * 3072 + 3072 + 2 * 1536  # an MLP matrix and its bias, plus the block's LayerNorms (its own unit)
    root = BENCH_ROOT - 2048 * 768  # the position embedding is a unit of its own, gathered at the ends only
    acc = linear["peaks"]["accumulation"]
    assert acc["gather_buffers"] == 4 * (root + 2 * unit)
    assert acc["unsharded_gradients"] == 4 * root + 8 * unit
    assert block["peaks"]["accumulation"]["total"] - acc["total"] == 16 * (BENCH_BLOCK - unit) + 8 * 2048 * 768
    assert linear["peaks"]["startup"] == block["peaks"]["startup"]
    # the choice is FSDP's: the trainer refuses it for DeepSpeed and DDP
    for dims in (ParallelDims(dp=8, zero_stage=3, zero_engine="deepspeed", fsdp_unit="linear"),
                 ParallelDims(dp=8, fsdp_unit="linear")):
        assert any("parallel.fsdp_unit 'linear' needs FSDP" in gap
                   for gap in trainer_gaps(dims, Workload(seq_len=64, precision="fp32")))


def test_defer_grad_reduce_holds_the_whole_unsharded_gradient():
    default, defer = bench_plan(dp=8, zero_stage=3), bench_plan(dp=8, zero_stage=3, defer_grad_reduce=True)
    acc = defer["peaks"]["accumulation"]
    # every unit's fp32 gradient until the last micro-batch, then one unit's reduce-scatter input
    assert acc["unsharded_gradients"] == 4 * BENCH_PARAMS + 4 * BENCH_BLOCK == 381_158_400
    assert acc["total"] - default["peaks"]["accumulation"]["total"] == 381_158_400 - 69_292_032
    for phase in ("startup", "save"):
        assert defer["peaks"][phase] == default["peaks"][phase]
    # only FSDP has the choice: DeepSpeed plans ignore it, and the trainer refuses it
    ds = ParallelDims(dp=8, zero_stage=3, zero_engine="deepspeed", defer_grad_reduce=True)
    assert plan_memory(get_preset("gpt3-125m").config(vocab_size=2048), ds, Workload(seq_len=64))["engine"] \
        == "deepspeed"
    assert any("parallel.defer_grad_reduce needs FSDP" in gap
               for gap in trainer_gaps(ds, Workload(seq_len=64, precision="fp32")))


def test_peaks_of_ddp_replicas_by_hand():
    # tiny: d 64, FFN 256, 2 blocks of 49,984, embeddings 512 x 64 and 128 x 64, final norm 128: 141,056
    n = 141_056
    plan = plan_memory(get_preset("tiny").config(), ParallelDims(dp=2),
                       Workload(seq_len=32, micro_batch=2, precision="fp32"))
    startup, acc, save = (plan["peaks"][phase] for phase in PHASES)
    assert plan["n_params"] == n and plan["engine"] == "replicas"
    # the whole fp32 replica, DDP's fp32 gradient buckets and one broadcast bucket (the replica: < 250 MiB)
    assert (startup["weights"], startup["comm_buffers"], startup["init_buffers"]) == (4 * n, 8 * n, 2**20)
    activations = 2 * 34 * 32 * 2 * 64 * 2 + 2 * 2 * 32 * 512 * 4  # 2 blocks fp32 + logits and gradient
    assert acc["at"] == "backward" and acc["total"] == 20 * n + activations == 3_640_320
    assert (save["total"], save["host_staging"]) == (16 * n, 12 * n)


def test_deepspeed_zero3_reads_the_trainers_deepspeed_config():
    plan = bench_plan(dp=8, zero_stage=3, zero_engine="deepspeed")
    dims = ParallelDims(dp=8, zero_stage=3, zero_engine="deepspeed")
    zero = deepspeed_zero_settings(get_preset("gpt3-125m").config(vocab_size=2048), dims,
                                   Workload(seq_len=64, precision="fp32"))
    acc, startup = plan["peaks"]["accumulation"], plan["peaks"]["startup"]
    assert plan["engine"] == "deepspeed"
    # buckets scale with d^2 (768^2 = 589,824, raised to the 2^20-element floor); two blocks live at most
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 2**20
    assert (zero["stage3_max_reuse_distance"], zero["stage3_max_live_parameters"]) == (0, 24 * 768**2)
    assert startup["comm_buffers"] == acc["comm_buffers"] == 4 * zero["reduce_bucket_size"]
    kept = BENCH_BLOCK + zero["stage3_prefetch_bucket_size"] + zero["stage3_max_reuse_distance"]
    assert acc["gather_buffers"] == 4 * min(BENCH_PARAMS, kept)
    # zero.Init builds each parameter whole before partitioning it: the largest, an MLP matrix
    # the step: AdamW on the flat partition holds two partition-sized temporaries, plus the flattened gradients
    assert acc["at"] == "optimizer step" and acc["optimizer_temporaries"] == 3 * 4 * BENCH_PARAMS / 8
    # and the optimizer set-up zero-fills an fp32 gradient buffer of the rank's partition
    assert startup["init_buffers"] == 2**20 + 4 * 3072 * 768 + 4 * BENCH_PARAMS / 8
    assert plan["peaks"]["save"]["host_staging"] == 12 * BENCH_PARAMS // 8


def test_fit_errors_name_the_peak_that_does_not_fit():
    plan = bench_plan(dp=8, zero_stage=3)  # start-up 45 MB, accumulation 356 MB, save 132 MB
    limit_gib = 200e6 / 0.9 / GIB
    assert fits(plan["peaks"]["save"]["total"], limit_gib) and not fits(plan["total"], limit_gib)
    (error,) = fit_errors(plan, limit_gib)
    assert error.startswith("accumulation peak 0.3 GiB (stage 0: ") and "exceeds 0.2 GiB" in error
    assert [e.split()[0] for e in fit_errors(plan, 30e6 / 0.9 / GIB)] == ["start-up", "accumulation", "save"]
    assert fit_errors(plan, 1.0) == []


def test_fits_keeps_a_safety_margin():
    limit = int(0.9 * 80 * GIB)
    assert fits(limit, 80) and not fits(limit + 1, 80)
    assert not fits(79 * GIB, 80)
    with pytest.raises(ValueError):
        fits(1, 0)


def test_layout_and_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="zero_stage must be one of 0, 1, 2, 3, got 4"):
        layout_of(1, 1, 1, 4)
    with pytest.raises(ValueError, match="recompute must be one of"):
        layout_of(1, 1, 1, 0, recompute="some")
    config = get_preset("gpt3-1.3b").config()  # 16 heads, 24 layers
    errors = shape_errors(config, *layout_of(32, 5, 1, 0))
    assert any("tp (32) must divide the model's n_head (16)" in e for e in errors)
    assert any("pp (5) must divide the model's n_layer (24)" in e for e in errors)
    with pytest.raises(ValueError, match="n_head"):
        plan_memory(config, *layout_of(32, 1, 1, 0))


def tp_pp_dp_zero(dims: ParallelDims) -> tuple[int, int, int, int]:
    return dims.tp, dims.pp, dims.dp, dims.zero_stage


def test_propose_layouts_fit_and_come_cheapest_first():
    big = get_preset("gpt3-175b").config()
    assert propose_layouts(big, n_gpus=8, gpus_per_node=8, gpu_memory_gib=80, seq_len=SEQ) == []
    proposals = propose_layouts(big, n_gpus=1024, gpus_per_node=8, gpu_memory_gib=80, seq_len=SEQ)
    assert proposals
    for p in proposals:
        lay = p.layout
        assert lay.tp * lay.pp * lay.dp == 1024 and lay.tp <= 8 and big.n_layer % lay.pp == 0
        assert fits(p.memory["total"], 80) and not (lay.zero_stage and lay.dp == 1)
    costs = [p.cost for p in proposals]
    assert costs == sorted(costs) and proposals[0].layout.recompute == "none"
    small = propose_layouts(get_preset("gpt3-125m").config(), n_gpus=8, gpus_per_node=8, gpu_memory_gib=80,
                            seq_len=SEQ)
    assert tp_pp_dp_zero(small[0].layout) == (1, 1, 8, 0)  # plain DDP wins for a small model
    # Only the layouts that fit come back: in 2 GiB the small model needs sharding or recompute.
    assert small[0].memory["total"] > 0.9 * 2 * GIB
    tight = propose_layouts(get_preset("gpt3-125m").config(), n_gpus=8, gpus_per_node=8, gpu_memory_gib=2,
                            seq_len=SEQ)
    assert tight and all(fits(p.memory["total"], 2) for p in tight) and len(tight) < len(small)
    assert tp_pp_dp_zero(tight[0].layout) != (1, 1, 8, 0)
    assert layout_cost(layout_of(1, 1, 8, 0, recompute="full")[0], 0) > layout_cost(layout_of(8, 1, 1, 0)[0], 10**12)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


HEADLINE = ["plan", "--preset", "gpt3-175b", "--zero", "1", "--recompute", "full", "--gpu-memory", "80", "--json"]


def test_cli_175b_fits_with_tp8_pp16_dp8_and_not_on_one_gpu():
    proc = subprocess.run(GPTFORGE + HEADLINE + ["--tp", "8", "--pp", "16", "--dp", "8"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["fits"] is True and row["layout"]["n_gpus"] == 1024
    planned = plan_memory(get_preset("gpt3-175b").config(), *layout_of(8, 16, 8, 1, recompute="full"))
    assert row["per_rank_bytes"]["total"] == planned["total"]
    assert sum(row["per_rank_bytes"][k] for k in MEMORY_KEYS) == row["per_rank_bytes"]["total"]
    assert row["per_rank_gib"]["total"] < 0.9 * 80
    assert row["memory_bytes"]["optimizer_state"] == 8 * row["n_params"]  # the single-replica fields stay
    proc = subprocess.run(GPTFORGE + HEADLINE + ["--tp", "1", "--pp", "1", "--dp", "1"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["layout"]["n_gpus"] == 1 and row["fits"] is False and row["per_rank_gib"]["total"] > 2000


def test_cli_json_propose(capsys):
    code, out, _ = run_cli(capsys, "--preset", "gpt3-1.3b", "--preset", "gpt3-175b", "--propose", "--gpus", "64",
                           "--top", "3", "--json")
    assert code == 0
    small, big = json.loads(out)
    assert small["global_batch_sequences"] == 512 and big["n_gpus"] == 64
    for row in (small, big):
        assert 1 <= len(row["layouts"]) <= 3 <= row["n_fitting"]
        for fields in row["layouts"]:
            assert fields["fits"] is True and fields["layout"]["n_gpus"] == 64
            assert fields["per_rank_gib"]["total"] <= 0.9 * row["gpu_memory_gib"]
    assert small["layouts"][0]["layout"]["recompute"] == "none"
    code, out, _ = run_cli(capsys, "--preset", "gpt3-13b", "--propose", "--gpus", "16", "--zero", "3",
                           "--recompute", "full", "--json")
    (row,) = json.loads(out)
    assert {(f["layout"]["zero_stage"], f["layout"]["recompute"]) for f in row["layouts"]} == {(3, "full")}
    # Table 2.1's 0.5M-token batch is 256 sequences: 512 GPUs cannot all be data-parallel replicas.
    code, out, _ = run_cli(capsys, "--preset", "gpt3-125m", "--propose", "--gpus", "512", "--json")
    (row,) = json.loads(out)
    assert row["global_batch_sequences"] == 256 and row["layouts"]
    assert all(f["layout"]["dp"] <= 256 for f in row["layouts"])
    code, out, _ = run_cli(capsys, "--preset", "gpt3-125m", "--propose", "--gpus", "512", "--global-batch", "1024",
                           "--json")
    assert json.loads(out)[0]["layouts"][0]["layout"]["dp"] == 512
    # --runnable: only what the trainer accepts (175B: FSDP2 with tp and with pipelines, DDP pipelines)
    code, out, _ = run_cli(capsys, "--preset", "gpt3-175b", "--propose", "--gpus", "1024", "--runnable", "--top",
                           "100", "--json")
    (row,) = json.loads(out)
    assert row["layouts"] and all(f["trainer_gaps"] == [] for f in row["layouts"])
    assert any(f["layout"]["pp"] > 1 for f in row["layouts"])
    assert any(f["layout"]["pp"] > 1 and f["layout"]["zero_stage"] == 3 for f in row["layouts"])
    assert all(f["layout"]["pp"] == 1 or f["layout"]["zero_stage"] != 1 for f in row["layouts"])


def test_cli_propose_keeps_layouts_whose_every_peak_fits(capsys):
    code, out, _ = run_cli(capsys, "--preset", "gpt3-175b", "--propose", "--gpus", "1024", "--top", "1000", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["n_fitting"] == len(row["layouts"]) > 0
    for fields in row["layouts"]:
        assert set(fields["peaks_gib"]) == {"startup", "accumulation", "save"}
        assert all(gib <= 0.9 * 80 for gib in fields["peaks_gib"].values()) and fields["fit_errors"] == []
        assert fields["per_rank_bytes"]["total"] == max(p["total"] for p in fields["peaks_bytes"].values())
    # deferring the gradient reduction costs memory: fewer FSDP layouts fit, the others are unchanged
    code, out, _ = run_cli(capsys, "--preset", "gpt3-175b", "--propose", "--gpus", "1024", "--top", "1000",
                           "--defer-grad-reduce", "--json")
    (deferred,) = json.loads(out)
    assert 0 < deferred["n_fitting"] < row["n_fitting"]
    assert all(f["layout"]["defer_grad_reduce"] == (f["layout"]["engine"] == "fsdp") for f in deferred["layouts"])


def test_cli_text_shows_the_three_peaks_and_the_one_that_does_not_fit(capsys):
    code, out, _ = run_cli(capsys, "--preset", "gpt3-125m", "--dp", "8", "--zero", "3", "--gpu-memory", "1")
    assert code == 0
    lines = out.splitlines()
    table = next(line for line in lines if line.startswith("gpt3-125m") and line.split()[1] == "1")
    assert table.split()[-2:] == ["NO", "fsdp"]
    for label in ("start-up", "accumulation", "save"):
        assert any(line.strip().startswith(label) and " GiB = " in line for line in lines), label
    assert any("host staging" in line for line in lines)
    (reason,) = [line for line in lines if "does not fit" in line]
    assert "does not fit: accumulation peak" in reason and "exceeds 0.9 GiB (90% of 1 GiB)" in reason
    code, out, _ = run_cli(capsys, "--preset", "gpt3-125m", "--dp", "8", "--zero", "3", "--defer-grad-reduce")
    assert "deferred gradient reduction" in out


def test_trainer_gaps_follow_the_trainers_rules():
    gaps = lambda *args, global_batch=None, **kw: trainer_gaps(*layout_of(*args, **kw), global_batch)  # noqa: E731
    assert gaps(8, 16, 8, 0, global_batch=1536) == []  # pipelines average gradients over replicas
    assert any("micro-batches" in g for g in gaps(8, 16, 8, 0, global_batch=64))  # 8 per step < pp 16
    assert any("deepspeed" in g for g in gaps(8, 16, 8, 1))  # ZeRO-1 is DeepSpeed's, data parallel only
    assert gaps(8, 16, 8, 3) == [] and gaps(8, 16, 8, 2) == []  # FSDP2 shards every pipeline stage
    assert gaps(1, 1, 8, 1) == [] and trainer_settings(*layout_of(1, 1, 8, 1))["zero_engine"] == "deepspeed"
    assert gaps(8, 1, 16, 3) == [] and trainer_settings(*layout_of(8, 1, 16, 3))["zero_engine"] == "fsdp"
    assert any("DDP does not" in g for g in gaps(2, 1, 4, 0))
    assert any("fp16" in g for g in gaps(2, 1, 4, 3, "fp16"))  # FSDP2 refuses fp16 ...
    assert gaps(1, 1, 8, 3, "fp16") == []  # ... DeepSpeed takes it
    assert any("fp16" in g for g in gaps(1, 2, 4, 0, "fp16"))
    assert any("optimizer_offload" in g or "deepspeed" in g for g in gaps(2, 1, 4, 2, optimizer_offload=True))


@pytest.mark.parametrize("argv, message", [
    (["--tp", "3"], "error: gpt3-13b: --tp (3) must divide the model's n_head (40)"),
    (["--tp", "0"], "error: --tp must be an integer >= 1, got 0"),
    (["--pp", "7"], "error: gpt3-13b: --pp (7) must divide the model's n_layer (40)"),
    (["--zero", "5"], "error: --zero must be one of 0, 1, 2, 3, got 5"),
    (["--recompute", "some"], "error: --recompute must be one of none, selective, full, got 'some'"),
    (["--gpu-memory", "0"], "error: --gpu-memory must be > 0"),
    (["--propose"], "error: --propose needs --gpus N"),
    (["--propose", "--gpus", "8", "--dp", "2"], "error: --dp cannot be combined with --propose"),
    (["--gpus", "8"], "error: --gpus only applies with --propose"),
    (["--runnable"], "error: --runnable only applies with --propose"),
    (["--defer-grad-reduce"], "error: --defer-grad-reduce needs --zero 2 or 3 (FSDP), got --zero 0"),
    (["--propose", "--gpus", "8", "--zero", "1", "--defer-grad-reduce"],
     "error: --defer-grad-reduce needs --zero 2 or 3 (FSDP), got --zero 1"),
])
def test_cli_bad_values_are_one_line_naming_the_flag(capsys, argv, message):
    code, out, err = run_cli(capsys, "--preset", "gpt3-13b", *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_one_set_of_layout_rules_names_config_keys_or_flags():
    from gptforge.parallel.config import ParallelConfig
    from gptforge.parallel.dims import value_errors
    from gptforge.parallel.plan_cli import FLAG_NAMES

    bad = ParallelConfig(tp=0, dp=1, zero_stage=5, recompute_every=0)
    errors: list[str] = []
    assert ParallelDims.from_config(bad, 8, errors) is None
    assert errors == ["parallel.tp must be an integer >= 1, got 0",
                      "parallel.recompute_every must be an integer >= 1, got 0",
                      "parallel.zero_stage must be one of 0, 1, 2, 3, got 5"]
    assert value_errors(bad, FLAG_NAMES) == ["--tp must be an integer >= 1, got 0",
                                             "--recompute-every must be an integer >= 1, got 0",
                                             "--zero must be one of 0, 1, 2, 3, got 5"]
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got 0"):
        ParallelDims(tp=0, dp=1)
    dims = ParallelDims.from_config(ParallelConfig(tp=2, zero_stage=3), 8, errors := [])
    assert errors == [] and (dims.tp, dims.dp, dims.world_size) == (2, 4, 8)
