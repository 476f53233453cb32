"""Every parallel layout trains exactly like one process (gloo ranks on CPU, tiny GPT, fp32, same seed
and data): the loss of every step and the validation loss agree to 1e-6 relative."""

import json
import os
import re

import pytest

from helpers.launch import config_errors, losses, records, run_train

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-gathered-logits": (2, ["parallel.tp=2", "parallel.loss_parallel=false"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "fsdp-zero2-dp2": (2, ["parallel.zero_stage=2"]),
    "fsdp-zero3-dp2": (2, ["parallel.zero_stage=3"]),
    "tp2-dp2-fsdp": (4, ["parallel.tp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=true"]),
    "dp2-fsdp-recompute-full": (2, ["parallel.zero_stage=3", "parallel.recompute=full"]),
    "tp2-recompute-selective": (2, ["parallel.tp=2", "parallel.recompute=selective"]),
    "deepspeed-zero1-dp2": (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=1"]),
    "deepspeed-zero2-dp2": (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"]),
    "deepspeed-zero3-dp2": (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=3"]),
    "deepspeed-zero2-offload-dp2": (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2",
                                        "parallel.optimizer_offload=true"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.sample_tokens=0"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.sample_tokens=0"]),
    "pp2-interleaved-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b",
                                 "parallel.virtual_stages=2", "train.sample_tokens=0"]),
    "pp2-dp2": (4, ["parallel.pp=2", "train.sample_tokens=0"]),
    "pp2-dp2-fsdp-zero3": (4, ["parallel.pp=2", "parallel.zero_stage=3", "train.sample_tokens=0"]),
    "pp2-interleaved-dp2-fsdp-zero2": (4, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b",
                                           "parallel.virtual_stages=2", "parallel.zero_stage=2",
                                           "train.sample_tokens=0"]),
    "tp2-pp2": (4, ["parallel.pp=2", "parallel.tp=2", "train.sample_tokens=0"]),
    "tp2-pp2-dp2-sp": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                           "train.sample_tokens=0"]),
    "tp2-pp2-dp2-fsdp-zero3": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=3",
                                   "train.sample_tokens=0"]),
}
COMMON = dict(train={"max_steps": 4, "eval_interval": 2, "global_batch_size": 4, "micro_batch_size": 1,
                     "seq_len": 32, "eval_samples": 6, "sample_tokens": 6},
              model={"preset": "tiny-sparse"})  # 4 layers, alternating dense/banded attention


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_model, indexed_prefix):
    import yaml

    from helpers.corpus import base_config

    root = tmp_path_factory.mktemp("reference")
    cfg = base_config(root / "run", tokenizer_model, indexed_prefix)
    for key, value in COMMON.items():
        cfg[key] = cfg[key] | value
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_train(str(path))
    assert proc.returncode == 0, proc.stderr
    (root / "run" / "train.out").write_text(proc.stdout)
    return root / "run"


def values_held(stdout: str) -> int:
    return int(re.search(r"rank 0 holds ([\d,]+) parameter values", stdout).group(1).replace(",", ""))


def assert_same_training(reference_dir, run_dir, steps=range(1, 5)):
    want, got = losses(reference_dir), losses(run_dir)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    val_want = {r["step"]: r["val_loss"] for r in records(reference_dir) if "val_loss" in r}
    val_got = {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}
    assert val_got == pytest.approx({s: v for s, v in val_want.items() if s in steps}, rel=1e-6)
    # Sampling with the same seed gives the same text under every layout (pipelines do not sample).
    summary = lambda d: json.load(open(os.path.join(d, "summary.json")))  # noqa: E731
    if "sample" in summary(run_dir):
        assert summary(run_dir)["sample"] == summary(reference_dir)["sample"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, reference, tmp_path, write_config):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    proc = run_train(write_config(run_dir=run_dir, **COMMON), *overrides, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_training(reference, run_dir)
    # Sharding really happened: rank 0 stores its share of the model (DeepSpeed hides its partitions).
    if "parallel.zero_engine=deepspeed" in overrides:
        return
    held, full = values_held(proc.stdout), values_held((reference / "train.out").read_text())
    degree = lambda key: int(next((o.split("=")[1] for o in overrides if o.startswith(key + "=")), 1))  # noqa: E731
    fsdp_dp = nproc // (degree("parallel.tp") * degree("parallel.pp")) if degree("parallel.zero_stage") >= 2 else 1
    divisor = degree("parallel.tp") * degree("parallel.pp") * fsdp_dp
    # Replicated LayerNorms/biases and the first stage's embeddings leave a rank a bit over its share.
    assert full / divisor <= held * 1.0001 and held <= 1.25 * full / divisor, (held, full, divisor)


def test_checkpoint_reshards_across_layouts(reference, tmp_path, write_config):
    """Save under tp2 at step 2, resume as FSDP dp2 (ZeRO-3): steps 3-4 equal the one-process run."""
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, "parallel.tp=2", "train.max_steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, "parallel.zero_stage=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir)
    state = json.load(open(os.path.join(run_dir, "checkpoints", "step_00000004", "trainer_state.json")))
    assert state["step"] == 4


PP = ["parallel.pp=2", "train.sample_tokens=0"]


@pytest.mark.parametrize("first, second", [
    ((2, PP + ["parallel.pp_schedule=interleaved-1f1b", "parallel.virtual_stages=2"]), (2, ["parallel.tp=2"])),
    ((4, PP + ["parallel.tp=2"]), (4, PP + ["parallel.zero_stage=3"])),
    ((4, PP + ["parallel.zero_stage=2"]), (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"])),
], ids=["pp2-interleaved-to-tp2", "tp2-pp2-to-pp2-dp2-fsdp", "pp2-dp2-fsdp-to-deepspeed-zero2"])
def test_pipeline_checkpoints_reshard(first, second, reference, tmp_path, write_config):
    """Save under a pipeline layout at step 2, resume under another: steps 3-4 equal one process."""
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, *first[1], "train.max_steps=2", nproc=first[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, *second[1], nproc=second[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir)


@pytest.mark.parametrize("first, second", [
    (["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"], ["parallel.zero_stage=3"]),  # DeepSpeed -> FSDP
    (["parallel.tp=2"], ["parallel.zero_engine=deepspeed", "parallel.zero_stage=3"]),  # tp -> DeepSpeed ZeRO-3
    (["parallel.zero_engine=deepspeed", "parallel.zero_stage=1"],
     ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2", "parallel.optimizer_offload=true"]),
], ids=["deepspeed-zero2-to-fsdp", "tp2-to-deepspeed-zero3", "deepspeed-zero1-to-zero2-offload"])
def test_deepspeed_checkpoints_reshard(first, second, reference, tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, *first, "train.max_steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, *second, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir)


def test_layout_errors_are_named_before_any_process_group(write_config):
    def errors(overrides, world_size, config=None) -> str:
        return "\n".join(config_errors(config or write_config(), overrides, world_size))

    text = errors(["parallel.tp=3", "parallel.dp=2"], 4)
    assert "parallel.pp (1) x parallel.tp (3) x parallel.dp (2) = 6 does not match the world size (4 processes)" in text
    text = errors(["parallel.tp=8"], 8)
    assert "model.n_head (4) must be divisible by parallel.tp (8)" in text
    text = errors(["parallel.tp=2", "parallel.zero_stage=1"], 4)
    assert "parallel.zero_stage must be 0 (DDP), 2 or 3 (FSDP2), got 1" in text
    text = errors(["parallel.tp=2"], 4)
    assert "needs parallel.zero_stage 2 or 3" in text
    text = errors(["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=33"], 2)
    assert "train.seq_len (33) must be divisible by parallel.tp (2)" in text
    text = errors(["parallel.zero_stage=3", "train.precision=fp16"], 2)
    assert "train.precision fp16 with parallel.zero_stage 2/3 (FSDP2) is not supported" in text
    text = errors(["parallel.pp=2", "parallel.zero_stage=3", "parallel.pp_schedule=interleaved-1f1b",
                   "train.sample_tokens=5"], 4)
    assert "'interleaved-1f1b' needs parallel.virtual_stages >= 2" in text
    text = errors(["parallel.pp=2", "parallel.virtual_stages=2", "parallel.pp_schedule=interleaved-1f1b"], 2,
                  config=write_config(model={"preset": "tiny"}))
    assert "model.n_layer (2) must be >= parallel.pp x parallel.virtual_stages (4)" in text
    text = errors(["parallel.pp=2", "train.micro_batch_size=4", "train.sample_tokens=1"], 2)
    assert "'1f1b' needs at least parallel.pp (2) micro-batches per step, got 1" in text
    assert "train.sample_tokens > 0 with parallel.pp > 1 is not supported" in text
    text = errors(["parallel.zero_engine=deepspeed", "parallel.tp=2", "parallel.zero_stage=1"], 4)
    assert "parallel.zero_engine=deepspeed shards data-parallel replicas only" in text
    text = errors(["parallel.zero_stage=1", "parallel.optimizer_offload=true"], 2)
    assert "ZeRO-1 needs parallel.zero_engine=deepspeed" in text
    assert "parallel.optimizer_offload needs parallel.zero_engine=deepspeed" in text
    text = errors(["parallel.recompute=some"], 1)
    assert "parallel.recompute: expected one of 'none', 'full', 'selective', got 'some'" in text


def test_bf16_fsdp_mixed_precision_tracks_one_process(tmp_path, write_config):
    """bf16: FSDP2's policy (bf16 params/compute, fp32 master and reduction) vs one process autocasting
    over fp32 weights. Not bitwise (different casts), so a loose bound; both must learn alike."""
    ref, fsdp = tmp_path / "ref", tmp_path / "fsdp"
    common = dict(train=COMMON["train"] | {"precision": "bf16", "max_steps": 6, "eval_interval": 0,
                                            "sample_tokens": 0}, model=COMMON["model"])
    assert run_train(write_config("r.yaml", run_dir=ref, **common)).returncode == 0
    proc = run_train(write_config("f.yaml", run_dir=fsdp, **common), "parallel.zero_stage=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = losses(ref), losses(fsdp)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-2)


def test_checkpoint_of_any_layout_loads_into_one_process(reference, tmp_path, write_config):
    """A tp2 x pp2 checkpoint consolidates into one process (model config and tokenizer inside it) with
    the same weights as the one-process run's checkpoint."""
    import torch

    from gptforge.training.trained_model import load_trained_model

    run_dir = tmp_path / "run"
    proc = run_train(write_config(run_dir=run_dir, **COMMON), *PP, "parallel.tp=2", nproc=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = load_trained_model(str(reference)), load_trained_model(str(run_dir))
    assert got.checkpoint.endswith("step_00000004") and got.config == want.config
    assert open(got.tokenizer_path, "rb").read() == open(want.tokenizer_path, "rb").read()
    # The two runs reduce in different orders (fp32), and Adam turns that rounding in near-zero gradients
    # (key biases, rare tokens' rows) into lr-sized steps, so weights agree to 1e-4. The logits are a
    # smooth function of those weights with O(1) values, so they agree to the same order and no better:
    # a tighter bound would hold only where the diverged weights happen not to matter.
    for (name, a), (_, b) in zip(want.model.state_dict().items(), got.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    tokens = torch.randint(0, want.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got.model(tokens), want.model(tokens), rtol=1e-4, atol=1e-4)
