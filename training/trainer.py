"""The pretraining loop: GPT-3's recipe on one process or any parallel layout (steps in steps.py).

Order of a step: pick the batch size (GPT-3 ramp), read the step's micro-batches at the global data
position, forward/backward each (gradients accumulate; loss is a sum divided by the global tokens),
clip the global grad norm, set the lr for the tokens after this step, optimizer step. Everything that
decides the next step (weights, optimizer, step, tokens, data position, RNG) is checkpointed, so a
resumed run reproduces the uninterrupted one exactly.

``Trainer`` sets up and runs the steps; everything around them (validation, console, ``metrics.jsonl``,
MLflow, checkpoints, signals, the end-of-run sample and plot) is a callback (``training/callbacks/``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..common.atomic import atomic_write_json
from ..common.errors import UserError
from ..common.hardware import compute_precision, device_spec
from ..model.flops import MFU_CONVENTIONS, count_parameters, flops_per_token
from ..model.gpt import GPT
from ..parallel import deepspeed_engine
from ..parallel.apply import parallelize
from ..parallel.distributed import all_reduce_, init_distributed
from .callbacks.base import Callback, resolve_callback
from .callbacks.checkpointing import Checkpointing
from .callbacks.console import ConsoleLog
from .callbacks.end_of_run import LossCurvePlot, Sample
from .callbacks.metrics_file import MetricsFile
from .callbacks.mlflow_tracking import MlflowTracking
from .callbacks.profiling import Profiling
from .callbacks.signals import StopOnSignal
from .callbacks.validation import Validation
from .checkpoint import CheckpointManager, tokenizer_file_name
from .data import build_gpt_datasets, build_mock_datasets
from .job import ResolvedJob
from .resume_check import check_resume, read_trainer_state, resume_identity
from .loader import BatchLoader
from .metrics import memory_metrics
from .steps import StepContext, step_loss, train_step


def build_optimizer(model: torch.nn.Module, job: ResolvedJob) -> torch.optim.AdamW:
    """AdamW; decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm gains."""
    o = job.job.optim
    # By full shape: a ZeRO-3 parameter built partitioned has an empty (1-D) tensor of its own.
    dims = {p: len(deepspeed_engine.param_shape(p)) for p in model.parameters() if p.requires_grad}
    decay = [p for p, dim in dims.items() if dim >= 2]
    no_decay = [p for p, dim in dims.items() if dim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel on CUDA: one launch for all parameters instead of several per tensor. DeepSpeed
    # steps its own flat partitions (its engine builds them from these groups).
    fused = fused_adamw(model, job)
    return torch.optim.AdamW(groups, lr=job.schedule.peak_lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             **({"fused": True} if fused else {}))


def fused_adamw(model: torch.nn.Module, job: ResolvedJob) -> bool:
    """AdamW's fused implementation where every parameter is on a CUDA device (DTensors included)."""
    params = list(model.parameters())
    return bool(params) and not job.dims.deepspeed and all(p.device.type == "cuda" for p in params)


@dataclass(kw_only=True)
class TrainState:
    """Everything a checkpoint restores: weights and optimizer (through the checkpoint manager's
    sharded files) and the counters (``state_dict``, in ``trainer_state.json``)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    engine: object | None = None
    """A DeepSpeed engine: it holds the optimizer's partitions."""
    step: int = 0
    tokens_seen: int = 0
    consumed_samples: int = 0
    """The global data position: samples of the training set read so far."""
    mlflow_run_id: str | None = None
    """The MLflow run this job logs to; a resumed job continues it."""

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "consumed_samples": self.consumed_samples,
                "mlflow_run_id": self.mlflow_run_id,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.consumed_samples = state["consumed_samples"]
        self.mlflow_run_id = state.get("mlflow_run_id")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, ckpt: CheckpointManager, metadata: dict, **kwargs) -> str:
        """Write a checkpoint of this state plus ``metadata`` (what describes the run, not its position)."""
        counters = self.state_dict()
        step = counters.pop("step")  # the manager names the folder by it and writes it back
        return ckpt.save(step, self.model, self.optimizer, counters | metadata, engine=self.engine, **kwargs)

    def load(self, ckpt: CheckpointManager, path: str, model_shape: dict) -> None:
        self.load_state_dict(ckpt.load(path, self.model, self.optimizer, model_shape, engine=self.engine))


def train(job: ResolvedJob, stream=sys.stdout) -> dict:
    """Run the job to ``train.max_steps`` (resuming per ``checkpoint.resume``); returns a summary."""
    return Trainer(job, stream).fit()


class Trainer:
    """Builds the model, optimizer and data of a resolved job, resumes, and runs the steps (``fit``).

    What callbacks read: ``job`` (the resolved job; ``cfg`` its config, ``t`` its train section),
    ``info`` (rank, world size, device), ``state`` (``TrainState``), ``model`` (this rank's model),
    ``module`` (what runs forwards: a DDP/compiled wrapper or the DeepSpeed engine), ``ctx`` (for
    ``steps.evaluate``), ``datasets``, ``dims``, ``resumed_from`` (checkpoint path or None), ``log``.
    """

    def __init__(self, job: ResolvedJob, stream=sys.stdout) -> None:
        self.job, self.cfg, self.t = job, job.job, job.job.train
        self.info = init_distributed(self.t.device)
        self._stream = stream
        if self.info.device.type == "cuda" and self.t.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (train.tf32)
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(self.t.seed)
        self.dims = job.dims
        self.mesh = self.dims.build_mesh(self.info.device.type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self._build_model()
        self._build_optimizer()
        self.ckpt = CheckpointManager(job.checkpoint_dir, self.cfg.checkpoint.keep_last, self.info,
                                      async_save=self.cfg.checkpoint.async_save)
        self.resumed_from = self._resume() if self.cfg.checkpoint.enabled else None
        self.datasets = self._build_datasets()
        self.ctx = StepContext(module=self.module, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                               dims=self.dims, device=self.info.device, autocast_precision=self.autocast_precision,
                               grad_clip=self.cfg.optim.grad_clip, dp_group=self.mesh["dp"].get_group(),
                               pipeline=self.pipeline, engine=self.engine)
        self.stop_requested = False
        """Set on every rank once any rank was signalled to stop (``callbacks/signals.py``)."""
        self.val_loss: float | None = None
        """The latest validation loss (``callbacks/validation.py``)."""
        self.artifacts: dict[str, str] = {}
        """Files made at the end of the run for the tracker: artifact folder -> path."""
        self.callbacks: list[Callback] = (builtin_observers(self.info.is_main, self.cfg.mlflow.enabled)
                                          + ([Profiling()] if self.t.profile_steps > 0 else [])
                                          + [resolve_callback(spec)() for spec in self.t.callbacks]
                                          + [StopOnSignal()] + ([Checkpointing()] if self.cfg.checkpoint.enabled else []))
        """Hook order: the built-in observers, the user's callbacks, then the stop-signal vote and the
        checkpoint decision, so a step's checkpoint sees everything the callbacks did at that step."""

    def log(self, msg: str) -> None:
        """A console line, from rank 0 only."""
        if self.info.is_main:
            print(msg, file=self._stream, flush=True)

    def _build_model(self) -> None:
        """On the meta device, then laid out, materialised and initialised (parallel/apply.py)."""
        job, info, dims = self.job, self.info, self.dims
        self.compile = self.t.compile if isinstance(self.t.compile, bool) else (
            info.device.type == "cuda" and dims.pp == 1 and not dims.deepspeed)
        """``train.compile`` resolved: ``auto`` compiles each block where CUDA is used (and the layout allows)."""
        if dims.deepspeed:  # ZeRO-3 partitions parameters as they are built (parallel/deepspeed_engine.py)
            self.model = deepspeed_engine.build_model(job.model, self._deepspeed_config(), info.device, self.t.seed)
            self.module, self.pipeline = self.model, None
        else:
            with torch.device("meta"):
                self.model = GPT(job.model)
            self.module, self.pipeline = parallelize(self.model, dims, self.mesh, info.device, self.t.seed,
                                                     self.t.precision, compile=self.compile)
        # FSDP and DeepSpeed run 16-bit compute through their own mixed precision; everything else autocasts.
        self.autocast_precision = "fp32" if dims.fsdp or dims.deepspeed else self.t.precision
        self.n_params = count_parameters(job.model)
        n = self.n_params["total"] - self.n_params["position_embedding"]
        self.flops_per_token = {key: flops_per_token(job.model, job.seq_len, n, key) for key in MFU_CONVENTIONS}
        """Training FLOPs per token in each MFU convention (``model/flops.py``)."""
        self.device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
        self.compute_precision = compute_precision(self.t.precision, self.t.tf32 and info.device.type == "cuda")
        spec = device_spec(self.device_name)
        self.peak_flops = (self.t.peak_tflops * 1e12 if self.t.peak_tflops
                           else spec.peak(self.compute_precision) if spec else None)
        """Dense peak FLOP/s of one device in the precision the matmuls run in (None: no MFU)."""

    def _build_optimizer(self) -> None:
        t = self.t
        self.optimizer = build_optimizer(self.model, self.job)
        self.engine = None
        if self.dims.deepspeed:
            self.engine = deepspeed_engine.build_engine(self.model, self.optimizer, self._deepspeed_config())
            self.module = self.engine
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=t.precision == "fp16" and self.engine is None)
        self.state = TrainState(model=self.model, optimizer=self.optimizer, scaler=self.scaler, engine=self.engine)

    def _deepspeed_config(self) -> dict:
        t = self.t
        return deepspeed_engine.deepspeed_config(dims=self.dims, d_model=self.job.model.d_model,
                                                 micro_batch=t.micro_batch_size,
                                                 global_batch=t.global_batch_size, precision=t.precision,
                                                 grad_clip=self.cfg.optim.grad_clip)

    def _resume(self) -> str | None:
        """Restore the newest (``auto``) or the given checkpoint; returns its path (None: a fresh start)."""
        resume = self.cfg.checkpoint.resume
        latest = self.ckpt.latest()
        if resume == "none" and latest is not None:
            raise UserError(f"checkpoint.resume is 'none' but {self.job.checkpoint_dir} already holds checkpoints; "
                             f"use --resume auto, or another run.dir")
        path = latest if resume == "auto" else (None if resume == "none" else resume)
        if path is not None:
            for change in check_resume(path, read_trainer_state(path), self.job):
                self.log(f"resuming with a change checkpoint.allow_changes accepts: {change}")
            self.state.load(self.ckpt, path, self.job.model.shape_dict())
            self.log(f"resumed from {path} at step {self.state.step} ({self.state.tokens_seen} tokens)")
        return path

    def _build_datasets(self):
        job, data, t = self.job, self.cfg.data, self.t
        if data.mock:
            return build_mock_datasets(seq_len=job.seq_len, seed=data.seed, vocab_size=job.model.vocab_size,
                                       valid_samples=t.eval_samples if t.eval_interval > 0 else 0)
        return build_gpt_datasets(
            paths=[s.path for s in data.sources], weights=[s.weight for s in data.sources], split=data.split,
            seq_len=job.seq_len, seed=data.seed, vocab_size=job.model.vocab_size, eod=job.tokenizer_eod,
            valid_samples=t.eval_samples if t.eval_interval > 0 else 0,
            cache_dir=job.cache_dir)

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint says about the run besides its position: shapes, config, tokenizer."""
        job = self.job
        return {"model_shape": job.model.shape_dict(), "world_size": self.info.world_size,
                "config": job.flat_params(), "model_config": dataclasses.asdict(job.model),
                "tokenizer_sha256": job.tokenizer_sha, "resume_identity": resume_identity(job)}

    def save_checkpoint(self) -> str:
        """A checkpoint of the current step (on every rank: the save is collective)."""
        tok = self.cfg.tokenizer.path if self.cfg.tokenizer else None
        files = {tokenizer_file_name(tok): tok} if tok else {}
        return self.state.save(self.ckpt, self.checkpoint_metadata(), files=files,
                               before_commit=lambda tmp: self._call("on_checkpoint_written", tmp))

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def is_log_step(self, step: int) -> bool:
        """Steps whose loss, grad norm, throughput and memory are read back from the device and reported:
        every ``train.log_interval``, validation steps and the last step."""
        t = self.t
        return (step % t.log_interval == 0 or step == t.max_steps
                or (t.eval_interval > 0 and step % t.eval_interval == 0))

    def train_step(self) -> dict:
        """One optimizer step at the current data position; returns its metrics record.

        Nothing in a step waits for the GPU: the loss and grad norm stay on the device, and only a log
        step reads them back (one synchronisation), with the throughput over the steps since the last one."""
        s, job = self.state, self.job
        step_batch = self.loader.next(s.consumed_samples, s.tokens_seen)
        batch = step_batch.batch
        # queued on the device with the step's work; the token count came from the host-side loss masks
        global_tokens = all_reduce_(step_batch.local_tokens, self.ctx.dp_group)
        s.tokens_seen += batch * job.seq_len
        s.consumed_samples += batch
        lr = job.schedule.lr(s.tokens_seen)
        loss_sum, grad_norm = train_step(self.ctx, step_batch.micro_batches, global_tokens, lr)
        s.step += 1
        record = {"step": s.step, "lr": lr, "batch_size": batch, "tokens_seen": s.tokens_seen}
        if self.is_log_step(s.step):
            record |= self._measure(step_loss(self.ctx, loss_sum), grad_norm, global_tokens)
        return record

    def _measure(self, loss_total: torch.Tensor, grad_norm: torch.Tensor, global_tokens: torch.Tensor) -> dict:
        """A log step's figures, read back in one synchronisation; throughput over the steps since the
        previous log step (or the start of this process)."""
        loss, grad_norm, tokens = torch.stack([loss_total.double(), grad_norm.double(), global_tokens]).tolist()
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        now, (since, tokens_then, step_then) = time.perf_counter(), self._interval
        self._interval = (now, self.state.tokens_seen, self.state.step)
        tokens_per_s = (self.state.tokens_seen - tokens_then) / (now - since)
        out = {"loss": loss / tokens, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
               "step_time_s": (now - since) / (self.state.step - step_then)}
        if self.peak_flops:
            for key, flops in self.flops_per_token.items():
                out[f"mfu_{key}"] = flops * tokens_per_s / (self.peak_flops * self.info.world_size)
        if self.scaler.is_enabled():
            out["loss_scale"] = self.scaler.get_scale()
        return out | memory_metrics(self.info.device)

    def fit(self) -> dict:
        """Run to ``train.max_steps`` (or a stop signal); returns the summary (also ``summary.json``)."""
        summary: dict = {"start_step": self.state.step}
        t = self.t
        self.loader = BatchLoader(self.datasets.train, batch_size=self.job.schedule.batch_size,
                                  seq_len=self.job.seq_len, micro=t.micro_batch_size, dp_rank=self.dp_rank,
                                  dp_size=self.dims.dp, device=self.info.device)
        try:
            self._call("on_train_start")
            self.module.train()
            self._interval = (time.perf_counter(), self.state.tokens_seen, self.state.step)
            while self.state.step < self.t.max_steps:
                self._call("on_step_end", self.train_step())
                if self.stop_requested:
                    self.log(f"stop requested by signal: saved step {self.state.step}, exiting")
                    break
            summary |= {"final_step": self.state.step, "tokens_seen": self.state.tokens_seen,
                        "val_loss": self.val_loss, "mlflow_run_id": self.state.mlflow_run_id}
            self._call("on_train_end", summary)
        finally:
            self.loader.close()
            self._call("close")
        if self.info.is_main:
            atomic_write_json(os.path.join(self.cfg.run.dir, "summary.json"), summary)
        if dist.is_initialized():
            dist.barrier()
        return summary


def builtin_observers(is_main: bool, mlflow: bool) -> list[Callback]:
    """The built-in callbacks that run before the user's, in hook order: validation first (it adds to
    the step's record), the sample before the plot, the plot before MLflow logs it, MLflow's run line
    before the console's model line. Files and tracking are rank 0's."""
    main_only = [MetricsFile(), LossCurvePlot()] + ([MlflowTracking()] if mlflow else [])
    return [Validation(), Sample()] + (main_only if is_main else []) + [ConsoleLog()]
