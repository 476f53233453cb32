"""Every shipped GPT-3 config is a valid job on whole 8-GPU nodes, follows Table 2.1, and fits 80 GB GPUs
by the planner; the 175B layout's weights per rank agree with the real sharding on a fake process group."""

import pathlib

import pytest
import yaml

from gptforge.common.config import build_dataclass
from gptforge.training.config import JobConfig
from gptforge.training.schedule import TokenSchedule
from gptforge.model.presets import PRESETS, gpt3_presets
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.fake_mesh import Measurement, measure_in_subprocess
from gptforge.parallel.planner import Layout, fits, plan_memory

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name: str):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    errors: list[str] = []
    job = build_dataclass(JobConfig, raw, "", errors)
    model = job.model.gpt_config(None, errors)
    assert errors == [] and job is not None, errors
    return raw, job, model


def test_every_gpt3_size_ships_a_config():
    assert {p.stem for p in CONFIGS.glob("gpt3-*.yaml")} == {p.name for p in gpt3_presets()}


@pytest.mark.parametrize("name", [p.name for p in gpt3_presets()])
def test_shipped_config_is_a_valid_layout_that_fits(name):
    raw, job, model = load(name)
    par, t, o = job.parallel, job.train, job.optim
    assert par.dp > 0, "shipped configs state their data-parallel size, so the GPU count is explicit"
    world = par.tp * par.pp * par.dp
    assert world % 8 == 0, "whole 8-GPU nodes"
    assert f"sbatch -N {world // 8} " in (CONFIGS / f"{name}.yaml").read_text()
    errors: list[str] = []
    dims = ParallelDims.resolve(tp=par.tp, dp=par.dp, pp=par.pp, sequence_parallel=par.sequence_parallel,
                                zero_stage=par.zero_stage, world_size=world, errors=errors,
                                recompute=par.recompute, virtual_stages=par.virtual_stages,
                                pp_schedule=par.pp_schedule, zero_engine=par.zero_engine)
    assert errors == [] and dims is not None, errors
    assert dims.validate_model(model, t.seq_len) == []
    schedule = TokenSchedule(peak_lr=o.lr, min_lr_ratio=o.min_lr_ratio, warmup_tokens=o.warmup_tokens,
                             decay_tokens=o.decay_tokens, seq_len=t.seq_len, full_batch=t.global_batch_size,
                             batch_multiple=t.micro_batch_size * dims.dp, ramp_start_tokens=o.batch_ramp_start_tokens,
                             ramp_tokens=o.batch_ramp_tokens)
    assert schedule.validate() == []
    if dims.pp > 1:
        assert schedule.batch_size(0) // (t.micro_batch_size * dims.dp) >= dims.pp
    preset = PRESETS[name]
    assert o.lr == preset.lr  # Table 2.1
    assert abs(t.global_batch_size * t.seq_len / preset.batch_tokens - 1) < 0.05
    plan = plan_memory(model, Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp, zero_stage=dims.zero_stage,
                                     micro_batch=t.micro_batch_size, seq_len=t.seq_len, recompute=dims.recompute,
                                     precision=t.precision, sequence_parallel=dims.sequence_parallel))
    assert fits(plan["total"], 80), f"{name}: {plan['total'] / 2**30:.1f} GiB per GPU"


def test_175b_layout_matches_the_sharded_meta_model():
    raw, job, model = load("gpt3-175b")
    par = job.parallel
    plan = plan_memory(model, Layout(tp=par.tp, pp=par.pp, dp=par.dp, zero_stage=par.zero_stage,
                                     micro_batch=job.train.micro_batch_size, seq_len=job.train.seq_len,
                                     recompute=par.recompute, sequence_parallel=par.sequence_parallel))
    (measured,) = measure_in_subprocess([Measurement(model=model.to_dict(), tp=par.tp, pp=par.pp, dp=par.dp,
                                                     zero_stage=par.zero_stage,
                                                     sequence_parallel=par.sequence_parallel)])
    planned = {stage["role"]: stage["weights"] for stage in plan["stages"]}
    for role, nbytes in measured.items():
        assert planned[role] == pytest.approx(nbytes, rel=0.05), role
    assert max(measured.values()) < 80 * 2**30 * 0.9
