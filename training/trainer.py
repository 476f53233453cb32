"""The pretraining loop: GPT-3's recipe on one process or any parallel layout (steps in steps.py).

Order of a step: pick the batch size (GPT-3 ramp), read the step's micro-batches at the global data
position, forward/backward each (gradients accumulate; loss is a sum divided by the global tokens),
clip the global grad norm, set the lr for the tokens after this step, optimizer step. Everything that
decides the next step (weights, optimizer, step, tokens, data position, RNG) is checkpointed, so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from ..common.atomic import atomic_write_json
from .data import build_gpt_datasets
from .checkpoint import CheckpointManager, tokenizer_file_name
from .job import ResolvedJob
from .metrics import MetricsLog, memory_metrics, plot_loss_curve
from ..common.tracking import Tracker, default_tracking_uri
from ..model.flops import count_parameters, flops_per_token, peak_flops
from ..model.gpt import GPT
from ..model.sample import sample
from .steps import StepContext, evaluate, micro_batches, train_step
from ..parallel import deepspeed_engine
from ..parallel.apply import parallelize
from ..parallel.loss import inference_forward
from ..parallel.distributed import all_reduce_sum, init_distributed


def build_optimizer(model: torch.nn.Module, job: ResolvedJob) -> torch.optim.AdamW:
    """AdamW; decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm gains."""
    o = job.job.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=job.schedule.peak_lr, betas=(o.beta1, o.beta2), eps=o.eps)


def _test_fault() -> tuple[str, int] | None:
    """Fault injection for the resume tests: GPTFORGE_TEST_FAULT=KIND@STEP, KIND one of ``sigkill``
    (the process kills itself after that step, before any checkpoint of it), ``sigterm`` (as SLURM
    does before a time limit) or ``sigkill-in-save`` (dies inside that step's checkpoint save)."""
    spec = os.environ.get("GPTFORGE_TEST_FAULT")
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    return kind, int(at)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameter values stored on this rank: a DTensor (tensor-parallel or FSDP) counts its local shard."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def train(job: ResolvedJob, stream=sys.stdout) -> dict:
    """Run the job to ``train.max_steps`` (resuming per ``checkpoint.resume``); returns a summary."""
    t, cfg = job.job.train, job.job
    info = init_distributed(t.device)
    log = (lambda msg: print(msg, file=stream, flush=True)) if info.is_main else (lambda msg: None)
    torch.manual_seed(t.seed)

    dims = job.dims
    mesh = dims.build_mesh(info.device.type)
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    # Build on the meta device, lay out, materialise, initialise (parallel/apply.py).
    with torch.device("meta"):
        model = GPT(job.model)
    ddp_model, pipeline = parallelize(model, dims, mesh, info.device, t.seed, t.precision)
    # FSDP and DeepSpeed run 16-bit compute through their own mixed precision; everything else autocasts.
    autocast_precision = "fp32" if dims.fsdp or dims.deepspeed else t.precision
    n_params = count_parameters(job.model)
    fpt = flops_per_token(job.model, job.seq_len, n_params["total"] - n_params["position_embedding"])
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
    peak = peak_flops(device_name)
    if t.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(model, job)
    engine = None
    if dims.deepspeed:
        engine = deepspeed_engine.build_engine(model, optimizer, deepspeed_engine.deepspeed_config(
            dims=dims, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size, precision=t.precision,
            grad_clip=cfg.optim.grad_clip))
        ddp_model = engine
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16" and engine is None)

    ckpt = CheckpointManager(job.checkpoint_dir, cfg.checkpoint.keep_last, info)
    resume = cfg.checkpoint.resume
    resume_path = ckpt.latest() if resume == "auto" else (None if resume == "none" else resume)
    if resume == "none" and ckpt.latest() is not None:
        raise ValueError(f"checkpoint.resume is 'none' but {job.checkpoint_dir} already holds checkpoints; "
                           f"use --resume auto, or another run.dir")
    step = tokens_seen = consumed = 0
    mlflow_run_id = None
    if resume_path is not None:
        state = ckpt.load(resume_path, model, optimizer, job.model.shape_dict(), engine=engine)
        step, tokens_seen, consumed = state["step"], state["tokens_seen"], state["consumed_samples"]
        mlflow_run_id = state.get("mlflow_run_id")
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log(f"resumed from {resume_path} at step {step} ({tokens_seen} tokens)")

    datasets = build_gpt_datasets(
        paths=[s.path for s in cfg.data.sources], weights=[s.weight for s in cfg.data.sources],
        split=cfg.data.split, seq_len=job.seq_len, seed=cfg.data.seed, vocab_size=job.model.vocab_size,
        eod=job.tokenizer_eod, train_samples=job.train_samples,
        valid_samples=t.eval_samples if t.eval_interval > 0 else 0, cache_dir=job.cache_dir,
    )

    tracker = None
    metrics_log = MetricsLog(os.path.join(cfg.run.dir, "metrics.jsonl"), step) if info.is_main else None
    if info.is_main and cfg.mlflow.enabled:
        uri = default_tracking_uri(cfg.run.dir, cfg.mlflow.tracking_uri)
        artifact_root = os.path.join(cfg.run.dir, "mlartifacts") if uri.startswith("sqlite:") else None
        tracker = Tracker(tracking_uri=uri, experiment=cfg.mlflow.experiment, run_name=cfg.mlflow.run_name,
                          run_id=mlflow_run_id, artifact_root=artifact_root)
        mlflow_run_id = tracker.run_id
        if resume_path is None:
            tracker.log_params(job.flat_params() | {"derived.n_params": str(n_params["total"])})
        tracker.log_artifact(os.path.abspath(job.job.tokenizer.path), "tokenizer")
        config_copy = os.path.join(cfg.run.dir, "resolved_config.json")
        atomic_write_json(config_copy, job.flat_params())
        tracker.log_artifact(config_copy, "config")
        log(f"MLflow run {mlflow_run_id} at {uri}")
    log(f"model {job.raw['model']['preset']}: {n_params['total']:,} parameters; {fpt / 1e6:.2f} MFLOPs/token; "
        f"{info.world_size} rank(s) on {info.device}{' (' + device_name + ')' if device_name else ''}; "
        f"pp {dims.pp} x dp {dims.dp} x tp {dims.tp}{' (sequence parallel)' if dims.sequence_parallel else ''}, "
        f"zero stage {dims.zero_stage}" + (f", {dims.pp_schedule} schedule" if dims.pp > 1 else ""))
    if engine is None:  # what sharding left on this rank (DeepSpeed keeps its partitions out of sight)
        log(f"rank 0 holds {local_parameter_count(model):,} parameter values")
    ctx = StepContext(module=ddp_model, model=model, optimizer=optimizer, scaler=scaler, dims=dims,
                      device=info.device, autocast_precision=autocast_precision, grad_clip=cfg.optim.grad_clip,
                      dp_group=dp_group, pipeline=pipeline, engine=engine)

    def trainer_state() -> dict:
        return {"tokens_seen": tokens_seen, "consumed_samples": consumed, "mlflow_run_id": mlflow_run_id,
                "model_shape": job.model.shape_dict(), "world_size": info.world_size,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "config": job.flat_params(), "model_config": dataclasses.asdict(job.model),
                "tokenizer_sha256": job.tokenizer_sha}

    stop = StopFlag()
    fault = _test_fault()
    micro = t.micro_batch_size
    summary: dict = {"start_step": step}
    val_loss = None
    ddp_model.train()
    while step < t.max_steps:
        t0 = time.perf_counter()
        batch = job.schedule.batch_size(tokens_seen)
        batches = micro_batches(datasets.train, consumed, batch, micro, dp_rank, dims.dp)
        local_tokens = sum(float(mb["loss_mask"].sum()) for mb in batches)
        (global_tokens,) = all_reduce_sum([local_tokens], info.device, dp_group)
        tokens_seen += batch * job.seq_len
        consumed += batch
        lr = job.schedule.lr(tokens_seen)
        loss_sum, grad_norm = train_step(ctx, batches, global_tokens, lr)
        step += 1
        (loss_total,) = all_reduce_sum([loss_sum], info.device, dp_group)
        loss_value = loss_total / global_tokens
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        dt = time.perf_counter() - t0
        tokens_per_s = batch * job.seq_len / dt
        mfu = fpt * tokens_per_s / (peak * info.world_size) if peak else None
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "batch_size": batch,
                  "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s, "step_time_s": dt}
        if mfu is not None:
            record["mfu"] = mfu
        if scaler.is_enabled():
            record["loss_scale"] = scaler.get_scale()
        if not math.isfinite(loss_value):
            log(f"step {step}: loss is {loss_value}")
        last_step = step == t.max_steps
        if t.eval_interval > 0 and (step % t.eval_interval == 0 or last_step):
            val_loss = evaluate(ctx, datasets.valid, t.eval_samples, micro, dp_rank)
            record["val_loss"] = val_loss
            record["val_ppl"] = math.exp(min(val_loss, 50.0))
        if metrics_log is not None:
            metrics_log.append(record)
        if step % t.log_interval == 0 or last_step or "val_loss" in record:
            msg = (f"step {step:>6}/{t.max_steps} loss {loss_value:.4f} lr {lr:.3e} gnorm {grad_norm:.3f} "
                   f"batch {batch} {tokens_per_s:,.0f} tok/s")
            if mfu is not None:
                msg += f" mfu {mfu:.1%}"
            if "val_loss" in record:
                msg += f" | val loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
            log(msg)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"} | memory_metrics(info.device),
                                    step)
        if fault is not None and fault[1] == step and fault[0] in ("sigkill", "sigterm"):
            os.kill(os.getpid(), signal.SIGKILL if fault[0] == "sigkill" else signal.SIGTERM)
        (stop_votes,) = all_reduce_sum([1.0 if stop.requested else 0.0], info.device)
        if step % cfg.checkpoint.interval == 0 or last_step or stop_votes > 0:
            kill_in_save = fault is not None and fault == ("sigkill-in-save", step)
            tokenizer_copy = {tokenizer_file_name(job.job.tokenizer.path): job.job.tokenizer.path}
            path = ckpt.save(step, model, optimizer, trainer_state(), engine=engine, files=tokenizer_copy,
                             before_commit=(lambda _: os.kill(os.getpid(), signal.SIGKILL)) if kill_in_save else None)
            log(f"checkpoint {path}")
        if stop_votes > 0:
            log(f"stop requested by signal: saved step {step}, exiting")
            break

    summary |= {"final_step": step, "tokens_seen": tokens_seen, "val_loss": val_loss, "mlflow_run_id": mlflow_run_id}
    if step == t.max_steps and t.sample_tokens > 0:
        from ..data_prep.tokenization.tokenizer import Tokenizer

        # Every rank samples the same tokens (same seed): sharded forwards need all of them.
        tok = Tokenizer(job.job.tokenizer.path)
        prompt = tok.encode(t.sample_prompt) if t.sample_prompt else [tok.eod]
        out = sample(model, prompt, max_new_tokens=t.sample_tokens, temperature=0.8, top_k=40,
                     forward=inference_forward(ddp_model, dims),
                     generator=torch.Generator(device=info.device).manual_seed(t.seed))
        summary["sample"] = t.sample_prompt + tok.decode([i for i in out if i != tok.eod])
        log("sample:\n" + summary["sample"])
    if info.is_main:
        png = plot_loss_curve(os.path.join(cfg.run.dir, "metrics.jsonl"), os.path.join(cfg.run.dir, "loss_curve.png"))
        if tracker is not None:
            if png:
                tracker.log_artifact(png, "plots")
            tracker.close(status="FINISHED" if step == t.max_steps else "KILLED")
            summary["mlflow_dropped_calls"] = tracker.dropped
        atomic_write_json(os.path.join(cfg.run.dir, "summary.json"), summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
