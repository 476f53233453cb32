"""Every shipped GPT-3 config is a valid job on whole 8-GPU nodes (by the trainer's own resolution,
``resolve_job``), follows Table 2.1, and fits 80 GB GPUs by the planner; the 175B layout's weights per rank
agree with the real sharding on a fake process group."""

import dataclasses
import pathlib

import pytest
import yaml

from gptforge.model.presets import PRESETS, gpt3_presets
from gptforge.parallel.fake_mesh import Measurement, measure_in_subprocess
from gptforge.parallel.planner import Workload, fits, plan_memory
from gptforge.training.job import ResolvedJob, resolve_job

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def resolve(tokenizer_model, indexed_prefix, tmp_path_factory):
    """resolve(name) -> the shipped config resolved on its own world size. Its tokenizer and data are not
    here, so the test corpus and tokenizer (conftest.py) stand in for them: the job's model then has their
    512-token vocabulary, and ``shipped_model`` puts the preset's GPT-2 vocabulary back."""
    run_dir = tmp_path_factory.mktemp("shipped")

    def resolve_shipped(name: str) -> ResolvedJob:
        path = CONFIGS / f"{name}.yaml"
        par = yaml.safe_load(path.read_text())["parallel"]
        assert par.get("dp", -1) > 0, "shipped configs state their data-parallel size, so the GPU count is explicit"
        world = par.get("tp", 1) * par.get("pp", 1) * par["dp"]
        overrides = [f"tokenizer.path={tokenizer_model}", f"data.sources=[{{path: {indexed_prefix}}}]",
                     f"run.dir={run_dir / name}"]
        return resolve_job(str(path), overrides, world_size=world)

    return resolve_shipped


def shipped_model(job: ResolvedJob):
    return dataclasses.replace(job.model, vocab_size=PRESETS[job.job.model.preset].config().vocab_size)


def test_every_gpt3_size_ships_a_config():
    assert {p.stem for p in CONFIGS.glob("gpt3-*.yaml")} == {p.name for p in gpt3_presets()}


@pytest.mark.parametrize("name", [p.name for p in gpt3_presets()])
def test_shipped_config_is_a_valid_layout_that_fits(resolve, name):
    job = resolve(name)
    dims, t, o = job.dims, job.job.train, job.job.optim
    world = dims.world_size
    assert world % 8 == 0, "whole 8-GPU nodes"
    assert f"sbatch -N {world // 8} " in (CONFIGS / f"{name}.yaml").read_text()
    model = shipped_model(job)
    assert dims.validate_model(model, t.seq_len) == []
    assert job.schedule.validate() == []
    if dims.pp > 1:
        assert job.schedule.batch_size(0) // (t.micro_batch_size * dims.dp) >= dims.pp
    preset = PRESETS[name]
    assert o.lr == preset.lr  # Table 2.1
    assert abs(t.global_batch_size * t.seq_len / preset.batch_tokens - 1) < 0.05
    plan = plan_memory(model, dims, Workload(micro_batch=t.micro_batch_size, seq_len=t.seq_len,
                                             precision=t.precision))
    assert fits(plan["total"], 80), f"{name}: {plan['total'] / 2**30:.1f} GiB per GPU"


def test_175b_layout_matches_the_sharded_meta_model(resolve):
    job = resolve("gpt3-175b")
    dims, model = job.dims, shipped_model(job)
    plan = plan_memory(model, dims, Workload(micro_batch=job.job.train.micro_batch_size, seq_len=job.seq_len))
    (measured,) = measure_in_subprocess([Measurement(model=model.to_dict(), tp=dims.tp, pp=dims.pp, dp=dims.dp,
                                                     zero_stage=dims.zero_stage,
                                                     sequence_parallel=dims.sequence_parallel)])
    planned = {stage["role"]: stage["weights"] for stage in plan["stages"]}
    for role, nbytes in measured.items():
        assert planned[role] == pytest.approx(nbytes, rel=0.05), role
    assert max(measured.values()) < 80 * 2**30 * 0.9
