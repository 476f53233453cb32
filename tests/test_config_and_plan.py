import json
import subprocess

import pytest
import yaml

from gptforge.training.job import resolve_job
from gptforge.training.schedule import TokenSchedule
from gptforge.model.presets import gpt3_presets

from helpers.launch import GPTFORGE, config_errors


def test_valid_config_resolves(write_config):
    job = resolve_job(write_config(), [], world_size=1)
    assert job.model.vocab_size == 512 and job.seq_len == 32
    assert job.schedule.peak_lr == 3e-3 and job.train_samples == 8 * 4
    params = job.flat_params()
    assert params["train.max_steps"] == "8" and params["model.d_model"] == "64"


def test_all_errors_are_collected_and_named(write_config):
    path = write_config(train={"max_steps": "many", "micro_batch_size": 3, "bogus": 1},
                        optim={"lr": 1e-3, "beta": 0.9}, checkpoint={"keep_last": 0})
    errors = config_errors(path)
    joined = "\n".join(errors)
    assert "train.max_steps: expected int, got 'many'" in joined
    assert "train.bogus: unknown key" in joined
    assert "optim.beta: unknown key" in joined
    assert len(errors) >= 3


def test_semantic_errors_are_collected_together(write_config):
    errors = config_errors(write_config(train={"micro_batch_size": 3, "seq_len": 4096}, checkpoint={"keep_last": 0}))
    joined = "\n".join(errors)
    assert "train.global_batch_size (4) must be a multiple of train.micro_batch_size x data-parallel ranks (3)" in joined
    assert "train.seq_len (4096) exceeds the model's context_length (128)" in joined
    assert "checkpoint.keep_last must be >= 1" in joined


def test_defer_grad_reduce_needs_fsdp(write_config):
    errors = config_errors(write_config(parallel={"defer_grad_reduce": True}))
    assert any(e.startswith("parallel.defer_grad_reduce needs FSDP (parallel.zero_engine=fsdp with "
                            "parallel.zero_stage 2 or 3), got parallel.zero_engine=fsdp with parallel.zero_stage 0")
               for e in errors), errors
    errors = config_errors(write_config(parallel={"defer_grad_reduce": True, "zero_stage": 3,
                                                  "zero_engine": "deepspeed"}))
    assert any("parallel.defer_grad_reduce needs FSDP" in e and "zero_engine=deepspeed" in e for e in errors)
    job = resolve_job(write_config(parallel={"defer_grad_reduce": True, "zero_stage": 3}), [], world_size=1)
    assert job.dims.defer_grad_reduce and job.dims.fsdp


def test_fsdp_unit_is_checked_and_needs_fsdp(write_config):
    errors = config_errors(write_config(parallel={"fsdp_unit": "layer"}))
    assert "parallel.fsdp_unit: expected one of 'block', 'linear', got 'layer'" in errors, errors
    errors = config_errors(write_config(parallel={"fsdp_unit": "linear"}))
    assert any(e.startswith("parallel.fsdp_unit 'linear' needs FSDP") for e in errors), errors
    job = resolve_job(write_config(parallel={"fsdp_unit": "linear", "zero_stage": 3}), [], world_size=1)
    assert job.dims.fsdp_unit == "linear" and job.dims.fsdp


def test_missing_sections_and_unknown_preset(write_config):
    errors = config_errors(write_config(train=None, model={"preset": "gpt5"}))
    joined = "\n".join(errors)
    assert "train: missing (required)" in joined
    assert "model.preset: unknown preset 'gpt5'" in joined


def test_overrides_apply_and_are_validated(write_config):
    job = resolve_job(write_config(), ["train.max_steps=3", "model.dropout=0.2", "optim.lr=1e-4"], world_size=1)
    assert job.job.train.max_steps == 3 and job.model.dropout == 0.2 and job.schedule.peak_lr == 1e-4
    errors = config_errors(write_config(), ["model.n_headz=2", "train.max_steps", "model.n_head=5"])
    joined = "\n".join(errors)
    assert "model.n_headz: unknown key" in joined
    assert "override 'train.max_steps' must look like key.sub=value" in joined
    assert "model.d_model (64) must be divisible by model.n_head (5)" in joined


def test_world_size_enters_batch_validation(write_config):
    errors = config_errors(write_config(train={"global_batch_size": 6, "micro_batch_size": 2}), world_size=2)
    assert any("multiple of train.micro_batch_size x data-parallel ranks (4)" in e for e in errors)


def test_vocab_mismatch_between_tokenizer_and_data(tmp_path, write_config, corpus_jsonl):
    from gptforge.data_prep.tokenization.tokenizer import train_tokenizer

    other = train_tokenizer([corpus_jsonl], str(tmp_path / "other"), vocab_size=600).model_path
    errors = config_errors(write_config(tokenizer={"path": other}))
    assert any("was tokenized with another tokenizer" in e and "data.sources[0].path" in e for e in errors)
    errors = config_errors(write_config(model={"preset": "tiny", "vocab_size": 1000}))
    assert any("model.vocab_size (1000) does not match the tokenizer's vocabulary (512)" in e for e in errors)


def test_missing_data_and_tiny_splits(tmp_path, write_config, indexed_prefix):
    errors = config_errors(write_config(data={"sources": [{"path": str(tmp_path / "nothing")}]}))
    assert any("data.sources[0].path" in e and "does not exist" in e for e in errors)
    # A 1% validation split of a small corpus holds no documents: refused up front (megatron-core would hang).
    errors = config_errors(write_config(data={"sources": [{"path": indexed_prefix}], "split": "999,1,0"}))
    assert any("validation split" in e and "fewer than one sequence" in e for e in errors)


def test_cli_reports_config_errors_without_traceback(write_config):
    proc = subprocess.run(GPTFORGE + ["train", "--config", write_config(train={"max_steps": -1})],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.max_steps must be >= 1, got -1" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(GPTFORGE + ["train", "--config", "no/such.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config: no such file 'no/such.yaml'" in proc.stderr


def test_shipped_configs_parse(tmp_path):
    import pathlib

    from gptforge.common.config import build_dataclass
    from gptforge.training.config import JobConfig

    for path in sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        errors: list[str] = []
        assert build_dataclass(JobConfig, yaml.safe_load(path.read_text()), "", errors) is not None, (path, errors)
        assert errors == [], (path, errors)


def test_plan_json_matches_table_2_1():
    proc = subprocess.run(GPTFORGE + ["plan", "--preset", "gpt3", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["preset"] for r in rows] == [p.name for p in gpt3_presets()]
    for row in rows:
        assert abs(row["params_vs_paper_pct"]) < 2.5
        assert abs(row["n_params"] / row["paper_params"] - 1) < 0.025
        mem = row["memory_bytes"]
        assert mem["optimizer_state"] == 8 * row["n_params"] and mem["weights"] == 2 * row["n_params"]
    assert rows[-1]["n_params"] > 174e9


def test_plan_unknown_preset_is_one_line():
    proc = subprocess.run(GPTFORGE + ["plan", "--preset", "gpt9"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown model preset 'gpt9'")


def test_lr_schedule_follows_gpt3_appendix_b():
    s = TokenSchedule(peak_lr=6e-4, min_lr_ratio=0.1, warmup_tokens=1000, decay_tokens=11000, seq_len=10,
                      full_batch=8, batch_multiple=2)
    assert s.lr(500) == pytest.approx(3e-4)  # linear warmup
    assert s.lr(1000) == pytest.approx(6e-4)  # peak
    assert s.lr(6000) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5)  # half-way down the cosine
    assert s.lr(11000) == pytest.approx(6e-5) and s.lr(10**9) == pytest.approx(6e-5)  # then constant 10 %


def test_batch_ramp_is_linear_in_tokens_and_in_whole_multiples():
    s = TokenSchedule(peak_lr=1.0, min_lr_ratio=0.1, warmup_tokens=0, decay_tokens=1, seq_len=100,
                      full_batch=64, batch_multiple=4, ramp_start_tokens=800, ramp_tokens=100_000)
    assert s.batch_size(0) == 8
    assert s.batch_size(50_000) == 36  # 8 + 56 / 2
    assert s.batch_size(100_000) == 64 and s.batch_size(10**9) == 64
    assert all(s.batch_size(t) % 4 == 0 for t in range(0, 120_000, 997))
    assert s.samples_for_steps(3) == 8 + 8 + 8  # 800 tokens per step barely moves the ramp
