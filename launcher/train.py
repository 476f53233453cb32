"""The pretraining loop: GPT-3's recipe on one process or data-parallel ranks.

Order of a step: pick the batch size (GPT-3 ramp), read the step's micro-batches at the global data
position, forward/backward each (gradients accumulate; loss is a sum divided by the global tokens),
clip the global grad norm, set the lr for the tokens after this step, optimizer step. Everything that
decides the next step (weights, optimizer, step, tokens, data position, RNG) is checkpointed, so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from gptforge.data_prep.atomic import atomic_write_json
from gptforge.data_prep.gpt_data import build_gpt_datasets
from gptforge.launcher.checkpoint import CheckpointManager
from gptforge.launcher.job import ResolvedJob
from gptforge.launcher.train_metrics import MetricsLog, memory_metrics, plot_loss_curve
from gptforge.launcher.tracking import Tracker, default_tracking_uri
from gptforge.model.flops import count_parameters, flops_per_token, peak_flops
from gptforge.model.gpt import GPT
from gptforge.model.sample import sample
from gptforge.parallel.apply import no_grad_sync, parallelize
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.loss import inference_forward, loss_context, token_loss_sum
from gptforge.parallel.distributed import all_reduce_sum, init_distributed


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


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _micro_batches(dataset, start: int, batch: int, micro: int, dp_rank: int, dp_size: int):
    """This data-parallel rank's micro-batches of the global batch of samples [start, start + batch)."""
    per_rank = batch // dp_size
    first = start + dp_rank * per_rank
    for m in range(per_rank // micro):
        items = [dataset[first + m * micro + j] for j in range(micro)]
        yield {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask")}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, n_samples: int, micro: int, dp_rank: int, dims: ParallelDims,
             precision: str, device: torch.device, dp_group) -> float:
    """Mean token loss over the first ``n_samples`` validation sequences, split over data-parallel ranks.

    Every rank runs the same number of forwards (sharded parameters are gathered collectively):
    a rank with fewer sequences repeats one with zero weight."""
    model.eval()
    n = min(n_samples, len(dataset))
    per_rank = -(-n // dims.dp)
    ids = [(i, 1.0) for i in range(dp_rank, n, dims.dp)]
    ids += [(0, 0.0)] * (per_rank - len(ids))
    total = tokens = 0.0
    for start in range(0, per_rank, micro):
        chunk = ids[start : start + micro]
        items = [dataset[i] for i, _ in chunk]
        x = torch.stack([it["tokens"] for it in items]).to(device)  # [b, T]
        y = torch.stack([it["labels"] for it in items]).to(device)
        weight = torch.tensor([w for _, w in chunk], device=device)[:, None]  # [b, 1]
        mask = torch.stack([it["loss_mask"] for it in items]).to(device) * weight
        with _autocast(precision, device), loss_context(dims):
            logits = model(x)
            total += float(token_loss_sum(logits, y, mask))
        tokens += float(mask.sum())
    model.train()
    total, tokens = all_reduce_sum([total, tokens], device, dp_group)
    return total / max(tokens, 1.0)


def _train_step(ddp_model, model, optimizer, scaler, micro_batches: list[dict], global_tokens: float, lr: float, *,
                precision: str, grad_clip: float, dims: ParallelDims, device: torch.device) -> tuple[float, float]:
    """Accumulate gradients over this rank's micro-batches, clip, step. Returns (local loss sum, grad norm)."""
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        x, y, mask = (mb[k].to(device) for k in ("tokens", "labels", "loss_mask"))  # each [b, T]
        last = i == len(micro_batches) - 1
        # Gradients are reduced over data-parallel ranks once per step, after the last micro-batch.
        sync = contextlib.nullcontext() if last else no_grad_sync(ddp_model, dims)
        with sync, loss_context(dims):
            with _autocast(precision, device):
                logits = ddp_model(x)  # [b, T, V] (with loss parallel: a DTensor, [b, T, V/tp] per rank)
            summed = token_loss_sum(logits, y, mask)
            # DDP/FSDP average gradients over dp ranks: scale by dp size to get sum / global tokens.
            scaler.scale(summed * (dims.dp / global_tokens)).backward()
        loss_sum += float(summed.detach())
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


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
    ddp_model = parallelize(model, dims, mesh, info.device, t.seed, t.precision)
    # FSDP runs 16-bit compute through its mixed-precision policy; everything else autocasts.
    autocast_precision = "fp32" if dims.zero_stage in (2, 3) else t.precision
    n_params = count_parameters(job.model)
    fpt = flops_per_token(job.model, job.seq_len, n_params["total"] - n_params["position_embedding"])
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
    peak = peak_flops(device_name)
    if t.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(model, job)
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")

    ckpt = CheckpointManager(job.checkpoint_dir, cfg.checkpoint.keep_last, info)
    resume = cfg.checkpoint.resume
    resume_path = ckpt.latest() if resume == "auto" else (None if resume == "none" else resume)
    if resume == "none" and ckpt.latest() is not None:
        raise ValueError(f"checkpoint.resume is 'none' but {job.checkpoint_dir} already holds checkpoints; "
                           f"use --resume auto, or another run.dir")
    step = tokens_seen = consumed = 0
    mlflow_run_id = None
    if resume_path is not None:
        state = ckpt.load(resume_path, model, optimizer, job.model.shape_dict())
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
        f"tp {dims.tp} x dp {dims.dp}{' (sequence parallel)' if dims.sequence_parallel else ''}, "
        f"zero stage {dims.zero_stage}")

    def trainer_state() -> dict:
        return {"tokens_seen": tokens_seen, "consumed_samples": consumed, "mlflow_run_id": mlflow_run_id,
                "model_shape": job.model.shape_dict(), "world_size": info.world_size,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "config": job.flat_params()}

    stop = StopFlag()
    fault = _test_fault()
    micro = t.micro_batch_size
    summary: dict = {"start_step": step}
    val_loss = None
    ddp_model.train()
    while step < t.max_steps:
        t0 = time.perf_counter()
        batch = job.schedule.batch_size(tokens_seen)
        micro_batches = list(_micro_batches(datasets.train, consumed, batch, micro, dp_rank, dims.dp))
        local_tokens = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
        (global_tokens,) = all_reduce_sum([local_tokens], info.device, dp_group)
        tokens_seen += batch * job.seq_len
        consumed += batch
        lr = job.schedule.lr(tokens_seen)
        loss_sum, grad_norm = _train_step(ddp_model, model, optimizer, scaler, micro_batches, global_tokens, lr,
                                          precision=autocast_precision, grad_clip=cfg.optim.grad_clip, dims=dims,
                                          device=info.device)
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
            val_loss = evaluate(model, datasets.valid, t.eval_samples, micro, dp_rank, dims, autocast_precision,
                                info.device, dp_group)
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
            path = ckpt.save(step, model, optimizer, trainer_state(), _die_before_rename=kill_in_save)
            log(f"checkpoint {path}")
        if stop_votes > 0:
            log(f"stop requested by signal: saved step {step}, exiting")
            break

    summary |= {"final_step": step, "tokens_seen": tokens_seen, "val_loss": val_loss, "mlflow_run_id": mlflow_run_id}
    if step == t.max_steps and t.sample_tokens > 0:
        from gptforge.data_prep.tokenizer import Tokenizer

        # Every rank samples the same tokens (same seed): sharded forwards need all of them.
        tok = Tokenizer(job.job.tokenizer.path)
        prompt = tok.encode(t.sample_prompt) if t.sample_prompt else [tok.eod]
        out = sample(model, prompt, max_new_tokens=t.sample_tokens, temperature=0.8, top_k=40,
                     forward=inference_forward(model, dims),
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
