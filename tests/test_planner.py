"""The memory planner (parallel/planner.py): its weights per rank against the trainer's real sharding on a fake
process group, its rules one by one, and ``gptforge plan`` with layout flags."""

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
    Workload,
    fits,
    param_counts,
    plan_memory,
    shape_errors,
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
    plan = plan_memory(config, *layout_of(tp, pp, dp, zero, precision, seq_len=min(SEQ, config.context_length)))
    planned = {}
    for stage in plan["stages"]:
        planned.setdefault(stage["role"], stage["weights"])  # middle stages all hold the same weights
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
    plan = plan_memory(config, *layout_of(4, 4, 8, 1))
    roles = [s["role"] for s in plan["stages"]]
    assert roles == ["first", "middle", "middle", "last"]
    first, middle, last = plan["stages"][0], plan["stages"][1], plan["stages"][3]
    assert first["params"] == one.token_embedding + one.position_embedding + 10 * one.block
    assert middle["params"] == 10 * one.block
    assert last["params"] == one.token_embedding + 10 * one.block + one.final_norm  # tied embedding copy
    assert plan["stage_role"] == "first" and plan["total"] == max(s["total"] for s in plan["stages"])
    assert plan["weights"] == first["params"] * 2
    # 1F1B (Korthikanti 4.2.1): the first stage holds n_layer blocks' worth of one micro-batch whatever pp is,
    # the last stage one micro-batch of its own blocks plus the logits.
    block = 34 * SEQ * 5120 // 4
    logits = SEQ * config.padded_vocab_size // 4 * 4
    assert first["activations"] == 40 * block
    assert last["activations"] == 10 * block + logits
    assert plan_memory(config, *layout_of(4, 1, 32, 1))["activations"] == 40 * block + logits


def test_zero_stages_shard_what_they_should():
    config = get_preset("gpt3-1.3b").config()
    plans = [plan_memory(config, *layout_of(2, 1, 8, zero)) for zero in range(4)]
    n = plans[0]["model_parallel_params"]
    assert (plans[0]["weights"], plans[0]["gradients"], plans[0]["master_weights"], plans[0]["optimizer_state"]) \
        == (2 * n, 2 * n, 4 * n, 8 * n)
    assert plans[1]["master_weights"] == 4 * n // 8 and plans[1]["optimizer_state"] == 8 * n // 8
    assert plans[1]["gradients"] == 2 * n and plans[2]["gradients"] == 2 * n // 8
    assert plans[2]["weights"] == 2 * n and plans[3]["weights"] == 2 * n // 8
    assert plans[3]["params_per_rank"] == n // 8 and plans[2]["params_per_rank"] == n
    assert [p["gather_buffers"] > 0 for p in plans] == [False, False, False, True]
    assert len({p["activations"] for p in plans}) == 1
    totals = [p["total"] for p in plans]
    assert totals == sorted(totals, reverse=True) and totals[0] > 3 * totals[3]
    offload = plan_memory(config, *layout_of(2, 1, 8, 1, optimizer_offload=True))
    assert offload["master_weights"] == offload["optimizer_state"] == 0
    assert offload["host_bytes"] == plans[1]["master_weights"] + plans[1]["optimizer_state"]
    assert offload["total"] == plans[1]["total"] - offload["host_bytes"]


def test_recompute_sequence_parallel_and_precision_change_activations():
    config = get_preset("gpt3-125m").config()  # 12 blocks, d 768
    sbh = SEQ * 768
    logits = SEQ * config.padded_vocab_size * 4
    act = {mode: plan_memory(config, *layout_of(1, 1, 1, 0, recompute=mode))["activations"] - logits
           for mode in ("none", "selective", "full")}
    assert act["none"] == 12 * 34 * sbh
    assert act["full"] == 12 * 2 * sbh + 34 * sbh  # block inputs + the block being recomputed
    assert act["selective"] == 6 * 2 * sbh + 6 * 34 * sbh + 34 * sbh  # blocks 0, 2, 4, ... checkpointed
    every3 = plan_memory(config, *layout_of(1, 1, 1, 0, recompute="selective", recompute_every=3))
    assert every3["activations"] - logits == 4 * 2 * sbh + 8 * 34 * sbh + 34 * sbh
    tp4 = lambda **kw: plan_memory(config, *layout_of(4, 1, 1, 0, **kw))["activations"] - logits // 4  # noqa: E731
    assert tp4() == 12 * 34 * sbh // 4
    assert tp4(sequence_parallel=False) == 12 * sbh * (10 + 24 // 4)
    assert tp4(recompute="full") == 12 * 2 * sbh // 4 + 34 * sbh // 4
    fp32 = plan_memory(config, *layout_of(1, 1, 1, 0, "fp32"))
    bf16 = plan_memory(config, *layout_of(1, 1, 1, 0))
    assert fp32["activations"] - logits == 2 * act["none"]
    assert fp32["weights"] == 2 * bf16["weights"] and fp32["master_weights"] == 0


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
