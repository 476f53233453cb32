"""Every parallel layout trains like one process (gloo ranks on CPU, tiny GPT, fp32, same seed and
data): the loss of every step and the validation loss agree within what evaluating the same sums in
another order can change (tests/helpers/tolerance.py), from 2.5e-6 of the loss at step 1 to 1.3e-5 for
the last validation, where a wrong shard or a missing all-reduce moves it by 2e-4 to 1e-2."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest
import torch

from helpers.launch import config_errors, losses, records, run_train
from helpers.tolerance import adam_drift_tolerance, chain_relative_tolerance, loss_rounding_tolerance

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-gathered-logits": (2, ["parallel.tp=2", "parallel.loss_parallel=false"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "fsdp-zero2-dp2": (2, ["parallel.zero_stage=2"]),
    "fsdp-zero3-dp2": (2, ["parallel.zero_stage=3"]),
    "tp2-dp2-fsdp": (4, ["parallel.tp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=true"]),
    "dp2-fsdp-recompute-full": (2, ["parallel.zero_stage=3", "parallel.recompute=full"]),
    "dp2-fsdp-linear-units-recompute-full": (2, ["parallel.zero_stage=3", "parallel.fsdp_unit=linear",
                                                 "parallel.recompute=full"]),
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
    "pp2-dp2-fsdp-zero3-linear-units": (4, ["parallel.pp=2", "parallel.zero_stage=3", "parallel.fsdp_unit=linear",
                                            "train.sample_tokens=0"]),
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


def validation_batches(config_path: str, cache_dir) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The validation sequences a run of this config evaluates, as (tokens, labels, loss_mask) [1, T]:
    training evaluates them one micro-batch (train.micro_batch_size = 1 here) at a time."""
    from gptforge.training.data import build_gpt_datasets
    from gptforge.training.job import resolve_job

    job = resolve_job(config_path, [], world_size=1)
    data, t = job.job.data, job.job.train
    datasets = build_gpt_datasets(paths=[s.path for s in data.sources], weights=[s.weight for s in data.sources],
                                  split=data.split, seq_len=job.seq_len, seed=data.seed,
                                  vocab_size=job.model.vocab_size, eod=job.tokenizer_eod,
                                  valid_samples=t.eval_samples, cache_dir=str(cache_dir))
    items = [datasets.valid[i] for i in range(t.eval_samples)]
    return [(it["tokens"][None], it["labels"][None], it["loss_mask"][None]) for it in items]


@dataclass(kw_only=True)
class LossBounds:
    """How far a correct layout's logged losses can be from the one-process run's (absolute)."""

    forward_step: float
    """One step's loss (4 micro-batches of [1, 32]) evaluated with every reduction in another order."""
    forward_val: float
    """The same for the validation loss (6 sequences of 32 tokens)."""
    lrs: list[float]
    grad_norms: list[float]
    """The one-process run's learning rate and gradient norm (before clipping) of every step."""
    rel_grad_error: float
    """How much reordering can change a step's gradient, relative to its norm."""

    def step(self, step: int) -> float:
        """The loss of ``step`` is computed on the weights of steps 1 .. step - 1."""
        return self.forward_step + adam_drift_tolerance(self.lrs[: step - 1], self.grad_norms[: step - 1],
                                                        self.rel_grad_error)

    def val(self, step: int) -> float:
        """Validation after ``step`` sees the weights of steps 1 .. step."""
        return self.forward_val + adam_drift_tolerance(self.lrs[:step], self.grad_norms[:step], self.rel_grad_error)


# How much reordering can change a step's gradient, relative to its norm (rho in
# tests/helpers/tolerance.py). Tensor parallelism reorders sums inside the forward and the backward;
# data parallelism, FSDP (reducing after every micro-batch or deferred), DeepSpeed and pipelines only
# the sum over the step's 4 micro-batches and ranks, which this covers too, as it does the few units of
# rounding of DeepSpeed's or the CPU Adam's own update. A gradient element sums, over the step's tokens,
# an activation times a back-propagated signal. The activation went through at most 33 reductions (per
# block: q, k, v, attention scores, probabilities x values, output projection, MLP in, MLP out; 4
# blocks; then the head), the signal through as many backwards, then come the sums over tokens and
# micro-batches: 68 reductions of at most 256 terms (the MLP width), 1.5e-3 of the gradient.
GRAD_REDUCTIONS, WIDEST_SUM = 68, 256


def loss_bounds(reference_dir, config_path, cache_dir, output_dtype=torch.float32) -> LossBounds:
    """The bounds for runs like the one-process run in ``reference_dir`` (its config at ``config_path``),
    with the model's rounding measured at its initial and its final weights, the larger counting."""
    from gptforge.model import build_model
    from gptforge.training.trained_model import load_trained_model

    trained = load_trained_model(str(reference_dir))
    seed = int(trained.state["config"]["train.seed"])
    models = [build_model(trained.config, seed=seed), trained.model]
    val = validation_batches(config_path, cache_dir)
    # Stand-in for a training step: 4 real sequences in the step's shapes (its data only sets magnitudes).
    step = val[:4]
    rounding = lambda batches: max(loss_rounding_tolerance(m, batches, output_dtype) for m in models)  # noqa: E731
    recs = records(reference_dir)
    return LossBounds(forward_step=rounding(step), forward_val=rounding(val), lrs=[r["lr"] for r in recs],
                      grad_norms=[r["grad_norm"] for r in recs],
                      rel_grad_error=chain_relative_tolerance(GRAD_REDUCTIONS, WIDEST_SUM, output_dtype=output_dtype))


@pytest.fixture(scope="module")
def bounds(reference, tmp_path_factory) -> LossBounds:
    return loss_bounds(reference, str(reference.parent / "job.yaml"), tmp_path_factory.mktemp("bounds_cache"))


def values_held(stdout: str) -> int:
    return int(re.search(r"rank 0 holds ([\d,]+) parameter values", stdout).group(1).replace(",", ""))


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as handle:
        return json.load(handle)


def assert_same_training(reference_dir, run_dir, bounds: LossBounds, steps=range(1, 5)):
    want, got = losses(reference_dir), losses(run_dir)
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - want[step]) <= bounds.step(step), (step, got[step], want[step], bounds.step(step))
    val_want = {r["step"]: r["val_loss"] for r in records(reference_dir) if "val_loss" in r}
    val_got = {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}
    assert sorted(val_got) == [s for s in sorted(val_want) if s in steps]
    for step, value in val_got.items():
        assert abs(value - val_want[step]) <= bounds.val(step), (step, value, val_want[step], bounds.val(step))
    assert_same_sample(reference_dir, run_dir)


SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40  # as training/callbacks/end_of_run.py samples
# The run's sampling forward is its model's, evaluated in another order: per logit at most this much of
# the logits' size (33 reductions of at most 256 terms on the way to a logit, as GRAD_REDUCTIONS counts).
SAMPLE_ROUNDING = chain_relative_tolerance(33, WIDEST_SUM)


def assert_same_sample(reference_dir, run_dir) -> None:
    """Sampling with the same seed gives the same text under every layout (pipelines do not sample),
    unless a draw of the one-process sample was so close that the runs' logit differences decide it:
    the texts are compared exactly only where that is ruled out, which is almost always."""
    got, want = summary(run_dir).get("sample"), summary(reference_dir).get("sample")
    if got is None or got == want:
        return
    closest, allowed = closest_draw(reference_dir, run_dir)
    assert closest <= allowed, (f"the sample differs ({got!r}, one process {want!r}) though every draw of the "
                                f"one-process sample was decided by {closest:.3g} or more of the logits, and "
                                f"the two runs' logits differ by at most {allowed:.3g}")


def race_margin(logits: torch.Tensor, exponentials: torch.Tensor, winner: int) -> float:
    """The smallest change of every logit ([V]) that could make another token win a top-k draw made as
    torch.multinomial makes one: the token with the largest p / q, q ~ Exp(1) (``exponentials``)."""
    scores = logits / SAMPLE_TEMPERATURE - exponentials.log()  # [V]: the race is won on these
    kth = logits.topk(SAMPLE_TOP_K).values[-1]
    others = torch.cat([logits[:winner], logits[winner + 1:]])
    # the winner drops out of the top k once k others pass it: each side moves by the change
    leave = float(logits[winner] - others.topk(SAMPLE_TOP_K).values[-1]) / 2
    # another token wins once it is in the top k and ahead in the race
    overtake = torch.maximum((scores[winner] - scores) * SAMPLE_TEMPERATURE / 2, (kth - logits).clamp(min=0) / 2)
    overtake[winner] = float("inf")
    return min(leave, float(overtake.min()))


@torch.no_grad()
def closest_draw(reference_dir, run_dir) -> tuple[float, float]:
    """Replays the one-process run's end-of-run sample from its final checkpoint; returns the smallest
    race margin of its draws and the largest difference of the two runs' logits there (their final
    models', measured, plus the run's rounding, SAMPLE_ROUNDING of the logits)."""
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer
    from gptforge.model.sample import filter_logits, next_tokens
    from gptforge.training.trained_model import load_trained_model

    ref, run = load_trained_model(str(reference_dir)), load_trained_model(str(run_dir))
    config = ref.state["config"]
    tok, prompt_text, vocab = Tokenizer(ref.tokenizer_path), config["train.sample_prompt"], ref.config.vocab_size
    prompt = tok.encode(prompt_text) if prompt_text else [tok.eod]
    generator = torch.Generator().manual_seed(int(config["train.seed"]))
    ids = torch.tensor([prompt])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's ranks compute: the replay is then the run's own computation
    closest, allowed = float("inf"), 0.0
    try:
        for _ in range(int(config["train.sample_tokens"])):
            window = ids[:, -ref.config.context_length:]
            logits = ref.model(window)[:, -1, :vocab].float()  # [1, V]
            other = run.model(window)[:, -1, :vocab].float()
            state = generator.get_state()
            token = next_tokens(logits, temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, generator=generator)
            after = generator.get_state()
            generator.set_state(state)
            probs = torch.softmax(filter_logits(logits / SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, top_p=1.0), -1)
            exponentials = torch.empty_like(probs).exponential_(1, generator=generator)
            assert torch.equal(generator.get_state(), after) and int((probs / exponentials).argmax()) == int(token), \
                "torch.multinomial no longer draws one sample as argmax(p / q), q ~ Exp(1): race_margin needs redoing"
            closest = min(closest, race_margin(logits[0], exponentials[0], int(token)))
            allowed = max(allowed, float((other - logits).abs().max()) + SAMPLE_ROUNDING * float(logits.abs().max()))
            ids = torch.cat([ids, token[:, None]], dim=1)
    finally:
        torch.set_num_threads(threads)
    replay = prompt_text + tok.decode([i for i in ids[0, len(prompt):].tolist() if i != tok.eod])
    assert replay == summary(reference_dir)["sample"], "the replay must draw the one-process run's sample"
    return closest, allowed


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, reference, bounds, tmp_path, write_config):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    proc = run_train(write_config(run_dir=run_dir, **COMMON), *overrides, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_training(reference, run_dir, bounds)
    # Sharding really happened: rank 0 stores its share of the model (DeepSpeed hides its partitions).
    if "parallel.zero_engine=deepspeed" in overrides:
        return
    held, full = values_held(proc.stdout), values_held((reference / "train.out").read_text())
    degree = lambda key: int(next((o.split("=")[1] for o in overrides if o.startswith(key + "=")), 1))  # noqa: E731
    fsdp_dp = nproc // (degree("parallel.tp") * degree("parallel.pp")) if degree("parallel.zero_stage") >= 2 else 1
    divisor = degree("parallel.tp") * degree("parallel.pp") * fsdp_dp
    # Replicated LayerNorms/biases and the first stage's embeddings leave a rank a bit over its share.
    assert full / divisor <= held * 1.0001 and held <= 1.25 * full / divisor, (held, full, divisor)


def test_checkpoint_reshards_across_layouts(reference, bounds, tmp_path, write_config):
    """Save under tp2 at step 2, resume as FSDP dp2 (ZeRO-3): steps 3-4 equal the one-process run (a
    checkpoint restores weights and optimizer state exactly, so the bounds are those of one run)."""
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, "parallel.tp=2", "train.max_steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, "parallel.zero_stage=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir, bounds)
    state = json.load(open(os.path.join(run_dir, "checkpoints", "step_00000004", "trainer_state.json")))
    assert state["step"] == 4


PP = ["parallel.pp=2", "train.sample_tokens=0"]


@pytest.mark.parametrize("first, second", [
    ((2, PP + ["parallel.pp_schedule=interleaved-1f1b", "parallel.virtual_stages=2"]), (2, ["parallel.tp=2"])),
    ((4, PP + ["parallel.tp=2"]), (4, PP + ["parallel.zero_stage=3"])),
    ((4, PP + ["parallel.zero_stage=2"]), (2, ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"])),
], ids=["pp2-interleaved-to-tp2", "tp2-pp2-to-pp2-dp2-fsdp", "pp2-dp2-fsdp-to-deepspeed-zero2"])
def test_pipeline_checkpoints_reshard(first, second, reference, bounds, tmp_path, write_config):
    """Save under a pipeline layout at step 2, resume under another: steps 3-4 equal one process."""
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, *first[1], "train.max_steps=2", nproc=first[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, *second[1], nproc=second[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir, bounds)


@pytest.mark.parametrize("first, second", [
    (["parallel.zero_engine=deepspeed", "parallel.zero_stage=2"], ["parallel.zero_stage=3"]),  # DeepSpeed -> FSDP
    (["parallel.tp=2"], ["parallel.zero_engine=deepspeed", "parallel.zero_stage=3"]),  # tp -> DeepSpeed ZeRO-3
    (["parallel.zero_engine=deepspeed", "parallel.zero_stage=1"],
     ["parallel.zero_engine=deepspeed", "parallel.zero_stage=2", "parallel.optimizer_offload=true"]),
], ids=["deepspeed-zero2-to-fsdp", "tp2-to-deepspeed-zero3", "deepspeed-zero1-to-zero2-offload"])
def test_deepspeed_checkpoints_reshard(first, second, reference, bounds, tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, **COMMON, checkpoint={"interval": 2, "keep_last": 2})
    proc = run_train(cfg, *first, "train.max_steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_train(cfg, *second, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert_same_training(reference, run_dir, bounds)


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
    over fp32 weights. They round to 16 bits in different places (FSDP also LayerNorms and the residual
    stream), so the bound counts every stored result and parameter as rounded to bf16 independently in
    each run (u = 2^-8): 7e-4 of the loss for a forward, and gradients that differ by 0.39 of their norm
    carried through AdamW, 4e-3 of the loss by step 6. Far looser than fp32's, but still below the 6e-3
    and 8e-3 by which a missing gradient all-reduce moves the losses of steps 2 and 4."""
    ref, fsdp = tmp_path / "ref", tmp_path / "fsdp"
    common = dict(train=COMMON["train"] | {"precision": "bf16", "max_steps": 6, "eval_interval": 0,
                                            "sample_tokens": 0}, model=COMMON["model"])
    ref_config = write_config("r.yaml", run_dir=ref, **common)
    assert run_train(ref_config).returncode == 0
    proc = run_train(write_config("f.yaml", run_dir=fsdp, **common), "parallel.zero_stage=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bf16 = loss_bounds(ref, ref_config, tmp_path / "cache", output_dtype=torch.bfloat16)
    want, got = losses(ref), losses(fsdp)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) <= bf16.step(step), (step, got[step], want[step], bf16.step(step))


def test_checkpoint_of_any_layout_loads_into_one_process(reference, bounds, tmp_path, write_config):
    """A tp2 x pp2 checkpoint consolidates into one process (model config and tokenizer inside it) with
    the weights that run trained: one process evaluating them gets the validation loss the run logged
    at its last step, to rounding; and the run trained like the one-process run."""
    from gptforge.model import lm_loss_sum
    from gptforge.training.trained_model import load_trained_model

    run_dir = tmp_path / "run"
    config = write_config(run_dir=run_dir, **COMMON)
    proc = run_train(config, *PP, "parallel.tp=2", nproc=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = load_trained_model(str(reference)), load_trained_model(str(run_dir))
    # copies of the config and of the tokenizer file: exact
    assert got.checkpoint.endswith("step_00000004") and got.config == want.config
    assert open(got.tokenizer_path, "rb").read() == open(want.tokenizer_path, "rb").read()
    assert_same_training(reference, run_dir, bounds)
    # Not its weights against the one-process run's: AdamW turns rounding noise in tiny gradients into
    # steps of up to lr, so single weights differ by 1e-5 (most by 1e-8), which no per-element bound
    # tells from a bug; the losses compared above are where the gradient's size cancels. Against the
    # run's own last validation the only difference is the order of one forward's sums.
    batches = validation_batches(config, tmp_path / "cache")
    with torch.no_grad():
        total = sum(float(lm_loss_sum(got.model(tokens), labels, mask)) for tokens, labels, mask in batches)
    val_loss = total / sum(float(mask.sum()) for _, _, mask in batches)
    logged = {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}[4]
    bound = loss_rounding_tolerance(got.model, batches)
    assert abs(val_loss - logged) <= bound, (val_loss, logged, bound)
