"""Resolve a training job: config + overrides -> every derived value, with all errors raised at once.

Runs before any process group exists (it only needs the world size, read from the launcher's
environment), so a bad config fails fast on every rank with the same message.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..common.config import load_config
from ..common.errors import UserError
from ..model.config import GPTConfig
from ..model.presets import PRESETS
from ..parallel.dims import ParallelDims
from ..parallel.distributed import resolve_device_kind
from .config import JobConfig
from .resume_check import RESUME_KEYS
from .schedule import TokenSchedule


@dataclass(kw_only=True)
class ResolvedJob:
    job: JobConfig
    model: GPTConfig
    schedule: TokenSchedule
    dims: ParallelDims
    seq_len: int
    world_size: int
    tokenizer_sha: str | None
    """None: no tokenizer (``data.mock``)."""
    tokenizer_eod: int | None
    checkpoint_dir: str
    cache_dir: str

    @property
    def train_samples(self) -> int:
        return self.schedule.samples_for_steps(self.job.train.max_steps)

    def flat_params(self) -> dict[str, str]:
        """The resolved config flattened to ``section.key`` -> str (MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, value) -> None:
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, sub in enumerate(value):
                    walk(f"{prefix}.{i}", sub)
            else:
                out[prefix] = str(value)

        walk("", dataclasses.asdict(self.job) | {"model": self.model.to_dict() | {
            "preset": self.job.model.preset}})
        out["derived.seq_len"] = str(self.seq_len)
        out["derived.world_size"] = str(self.world_size)
        out["derived.peak_lr"] = str(self.schedule.peak_lr)
        out["derived.train_samples"] = str(self.train_samples)
        return out


def resolve_job(config_path: str, overrides: list[str], world_size: int | None = None) -> ResolvedJob:
    """Load and check a training config; every problem of every section in one ``ConfigError``."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    derived: dict = {}
    job = load_config(JobConfig, config_path, overrides,
                      check=lambda cfg, errors: derived.update(_check_job(cfg, world_size, errors)))
    return ResolvedJob(job=job, world_size=world_size, checkpoint_dir=job.checkpoint.dir or os.path.join(
        job.run.dir, "checkpoints"), cache_dir=job.data.cache_dir or os.path.join(job.run.dir, "data_cache"),
        **derived)


def _check_job(job: JobConfig, world_size: int, errors: list[str]) -> dict:
    """The checks across sections (structural errors of a section leave it None); returns the derived
    values of a config without errors."""
    from ..data_prep.tokenization.tokenizer import Tokenizer
    from .data import check_sources

    tokenizer = None
    if job.tokenizer is not None:
        try:
            tokenizer = Tokenizer(job.tokenizer.path)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
            errors.append(f"tokenizer.path: {err}")
    model = job.model.gpt_config(tokenizer.vocab_size if tokenizer else None, errors) if job.model else None
    if errors or any(getattr(job, f.name) is None for f in dataclasses.fields(job) if f.name != "tokenizer"):
        # The checks below need a well-formed config.
        return {}
    mock = job.data.mock
    if job.tokenizer is None and not mock:
        errors.append("tokenizer: required (only data.mock: true trains without one)")
    if not mock and not job.data.sources:
        errors.append("data.sources: give at least one indexed dataset (or data.mock: true for synthetic tokens)")
    if mock and job.data.sources:
        errors.append("data.mock: true trains on synthetic tokens; remove data.sources or set data.mock: false")
    if tokenizer is None and job.train.sample_tokens > 0:
        errors.append("train.sample_tokens > 0 needs a tokenizer: set tokenizer.path or train.sample_tokens=0")

    t, o, c = job.train, job.optim, job.checkpoint
    for key, value, low in (("train.max_steps", t.max_steps, 1), ("train.global_batch_size", t.global_batch_size, 1),
                            ("train.micro_batch_size", t.micro_batch_size, 1), ("train.log_interval", t.log_interval, 1),
                            ("train.eval_interval", t.eval_interval, 0), ("train.eval_samples", t.eval_samples, 0),
                            ("train.sample_tokens", t.sample_tokens, 0), ("checkpoint.interval", c.interval, 1),
                            ("train.profile_steps", t.profile_steps, 0), ("train.profile_after", t.profile_after, 0),
                            ("checkpoint.keep_last", c.keep_last, 1)):
        if value < low:
            errors.append(f"{key} must be >= {low}, got {value}")
    if o.grad_clip < 0 or o.weight_decay < 0 or o.eps <= 0 or not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        errors.append("optim: need grad_clip >= 0, weight_decay >= 0, eps > 0 and betas in [0, 1)")
    if t.eval_interval > 0 and t.eval_samples == 0:
        errors.append("train.eval_samples must be >= 1 when train.eval_interval > 0")
    for i, source in enumerate(job.data.sources):
        if source is not None and source.weight <= 0:
            errors.append(f"data.sources[{i}].weight must be > 0, got {source.weight}")
    for i, key in enumerate(c.allow_changes):
        if key not in RESUME_KEYS:
            errors.append(f"checkpoint.allow_changes[{i}]: {key!r} is not one of {', '.join(RESUME_KEYS)}")
    if not c.enabled and c.resume not in ("auto", "none"):
        errors.append(f"checkpoint.resume: {c.resume!r} with checkpoint.enabled: false (nothing is read)")
    elif c.resume not in ("auto", "none") and not os.path.isdir(c.resume):
        errors.append(f"checkpoint.resume: expected 'auto', 'none' or a checkpoint directory, got {c.resume!r}")

    seq_len = t.seq_len
    if model is not None:
        seq_len = seq_len or model.context_length
        if seq_len > model.context_length:
            errors.append(f"train.seq_len ({seq_len}) exceeds the model's context_length ({model.context_length})")
    if seq_len is not None and seq_len < 1:
        errors.append(f"train.seq_len must be >= 1, got {seq_len}")

    try:  # GPUs that this torch cannot use are a config error too, not a silent CPU run
        resolve_device_kind(t.device)
    except UserError as err:
        errors.append(str(err))

    dims = ParallelDims.from_config(job.parallel, world_size, errors)
    if dims is not None and model is not None and seq_len:
        errors.extend(dims.validate_model(model, seq_len))
    if dims is not None and dims.pp > 1:
        if t.compile is True:
            errors.append("train.compile: true with parallel.pp > 1 is not supported (stages run eagerly; "
                          "'auto' leaves it off)")
        if t.sample_tokens > 0:
            errors.append("train.sample_tokens > 0 with parallel.pp > 1 is not supported: set it to 0")
    if dims is not None and dims.deepspeed and t.compile is True:
        errors.append("train.compile: true with parallel.zero_engine=deepspeed is not supported ('auto' leaves it off)")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        errors.append(f"train.peak_tflops must be > 0, got {t.peak_tflops}")
    if dims is not None:
        errors.extend(dims.precision_errors(t.precision))

    preset = PRESETS[job.model.preset]
    peak_lr = o.lr if o.lr is not None else preset.lr
    if peak_lr is None:
        errors.append(f"optim.lr: required, preset {preset.name!r} has no paper learning rate")
    schedule = None
    if seq_len and peak_lr is not None and t.micro_batch_size >= 1 and dims is not None:
        schedule = TokenSchedule(
            peak_lr=peak_lr, min_lr_ratio=o.min_lr_ratio, warmup_tokens=o.warmup_tokens, decay_tokens=o.decay_tokens,
            seq_len=seq_len, full_batch=t.global_batch_size, batch_multiple=t.micro_batch_size * dims.dp,
            ramp_start_tokens=o.batch_ramp_start_tokens, ramp_tokens=o.batch_ramp_tokens,
        )
        errors.extend(schedule.validate())
        # The smallest step is the start of the batch ramp.
        errors.extend(dims.micro_batch_errors(schedule.batch_size(0) // (t.micro_batch_size * dims.dp)))

    if tokenizer is not None and seq_len and not errors and not mock:
        sources = [s for s in job.data.sources if s is not None]
        errors.extend(check_sources([s.path for s in sources], job.data.split, seq_len, tokenizer.sha256,
                                    tokenizer.vocab_size, need_valid=t.eval_interval > 0))
    if errors:
        return {}
    return dict(model=model, schedule=schedule, dims=dims, seq_len=seq_len,
                tokenizer_sha=tokenizer.sha256 if tokenizer else None, tokenizer_eod=tokenizer.eod if tokenizer else None)
