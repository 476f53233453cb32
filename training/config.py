"""Typed sections of a training config (``configs/*.yaml``). Loading: ``common/config.py``; the
checks across sections: ``job.py``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..model.config import GPTConfig, ModelConfigError
from ..model.presets import PRESETS
from ..parallel.config import ParallelConfig

_UNSET = object()  # a GPTConfig field the config does not set: the preset's value applies


def _model_section_post_init(self) -> None:
    if self.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {self.preset!r} (choose one of: {', '.join(PRESETS)})")


def _model_section_gpt_config(self, vocab_size: int | None, errors: list[str]) -> GPTConfig | None:
    """The preset's values, then the fields this section sets; the tokenizer fixes the vocabulary."""
    overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)
                 if getattr(self, f.name) is not _UNSET}
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            errors.append(
                f"model.vocab_size ({overrides['vocab_size']}) does not match the tokenizer's vocabulary "
                f"({vocab_size}); remove model.vocab_size or use the matching tokenizer")
            return None
        overrides["vocab_size"] = vocab_size
    try:
        return GPTConfig(**(PRESETS[self.preset].model | overrides))
    except ModelConfigError as err:
        errors.extend(err.errors)
    except TypeError as err:
        errors.append(f"model: {err}")
    return None


# ``model: {preset: NAME, <any GPTConfig field>: value}``: typed from GPTConfig itself, so a new model
# field is a config key with its type checked, with no second list to keep in step.
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("preset", str)] + [(f.name, typing.get_type_hints(GPTConfig)[f.name], field(default=_UNSET))
                         for f in dataclasses.fields(GPTConfig)],
    namespace={"__post_init__": _model_section_post_init, "gpt_config": _model_section_gpt_config,
               "__doc__": "A preset name (model/presets.py) plus any GPTConfig fields that override it.",
               "__module__": __name__},
    kw_only=True,
)


@dataclass(kw_only=True)
class DataSource:
    """One indexed dataset of the training mixture."""

    path: str
    """Prefix of a ``gptforge tokenize`` output (``PATH.bin``, ``PATH.idx``, ``PATH.json``)."""
    weight: float = 1.0
    """Relative sampling weight in the mixture (GPT-3 Table 2.2 column "weight in training mix")."""


@dataclass(kw_only=True)
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """The mixture; weights are normalised by megatron-core's BlendedMegatronDatasetBuilder."""
    mock: bool = False
    """Train on synthetic tokens instead of ``sources`` (Megatron-LM's ``--mock-data``): sample ``i`` is
    uniform random ids over the vocabulary, drawn from (``seed``, i), so it is the same in every run and
    layout. For throughput and memory runs (``bench/gpu.sh``) with no data prepared; no tokenizer is
    needed (the model's ``vocab_size`` applies)."""
    split: str = "969,30,1"
    """Train, validation, test proportions of every source's documents (Megatron's ``--split``)."""
    seed: int = 1234
    """Seed of the document/sample shuffles: the same seed gives the same sample order."""
    cache_dir: str | None = None
    """Where megatron-core caches its sample indices; default ``<run.dir>/data_cache``."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int
    """Optimizer steps to train for."""
    global_batch_size: int
    """Sequences per optimizer step at full batch (GPT-3 Table 2.1 batch / seq_len)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    seq_len: int | None = None
    """Tokens per sequence; default: the model's context length."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype. bf16/fp16 use autocast over fp32 weights; fp16 adds dynamic loss scaling."""
    compile: bool | Literal["auto"] = "auto"
    """``torch.compile`` each transformer block in place (parameter names unchanged, so checkpoints are
    the same). ``auto``: on where training runs on CUDA and the layout supports it (not with
    ``parallel.pp > 1`` or the DeepSpeed engine), off on the CPU."""
    tf32: bool = True
    """On CUDA, run fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation);
    MFU of an fp32 run is then taken against the TF32 peak."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device in the precision in use, for MFU on a device that
    ``common/hardware.py`` does not list (it overrides the table)."""
    seed: int = 1234
    """Seed of weight init and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available, else CPU."""
    log_interval: int = 10
    """Print and track metrics every this many steps."""
    eval_interval: int = 100
    """Validation every this many steps (and after the last step); 0 disables periodic validation."""
    eval_samples: int = 64
    """Validation sequences (the same first ones every time, so curves are comparable)."""
    profile_steps: int = 0
    """Profile this many steps with ``torch.profiler`` (0: none): a Chrome trace and an operator table per
    rank in ``<run.dir>/profile/`` (``training/callbacks/profiling.py``)."""
    profile_after: int = 2
    """Steps of this process before the profiled ones (compilation and warm-up)."""
    sample_tokens: int = 0
    """After training, print a sample of this many tokens (0: none)."""
    sample_prompt: str = ""
    """Prompt of that sample (empty: start from the end-of-document token)."""
    callbacks: list[str] = field(default_factory=list)
    """User callbacks, each ``"package.module:Class"``: a ``gptforge.training.callbacks.Callback``
    subclass built with no arguments, run after the built-in ones at every hook (see its docstring)."""

    def __post_init__(self) -> None:
        from .callbacks.base import resolve_callback

        errors = []
        for i, spec in enumerate(self.callbacks):
            try:
                resolve_callback(spec)
            except ValueError as err:
                errors.append(f"train.callbacks[{i}]: {err}")
        if errors:  # the config loader reports this under the section's key, with the other errors
            raise ValueError("; ".join(errors))


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the schedule of GPT-3 Appendix B; schedules are in tokens, as in the paper."""

    lr: float | None = None
    """Peak learning rate; default: the preset's Table 2.1 value."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak ("decay to 10 % of its value")."""
    warmup_tokens: int = 375_000_000
    """Linear warmup over the first tokens (GPT-3: 375M)."""
    decay_tokens: int = 260_000_000_000
    """Cosine decay ends after these tokens, then the lr stays at min_lr_ratio x peak (GPT-3: 260B)."""
    batch_ramp_start_tokens: int = 32_768
    """Batch size at the start of the ramp, in tokens (GPT-3: 32k)."""
    batch_ramp_tokens: int = 0
    """Ramp the batch linearly to full over these tokens (GPT-3: 4-12B by size); 0 disables the ramp."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings; never on biases or LayerNorm gains."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global-norm gradient clipping; 0 disables."""


@dataclass(kw_only=True)
class CheckpointConfig:
    enabled: bool = True
    """``false``: no checkpoint is read or written (throughput runs such as ``bench/gpu.sh``); a stop
    signal then ends the run without saving."""
    dir: str | None = None
    """Default ``<run.dir>/checkpoints``."""
    interval: int = 1000
    """Save every this many steps (and always at the end or on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """``auto``: newest complete checkpoint if any; ``none``: start fresh; or a checkpoint path."""
    allow_changes: list[str] = field(default_factory=list)
    """What a resume may find changed since the checkpoint was written (otherwise refused, naming every
    difference): any of ``tokenizer``, ``data.sources``, ``data.split``, ``data.seed``, ``train.seq_len``,
    ``train.global_batch_size``, ``optim.batch_ramp_start_tokens``, ``optim.batch_ramp_tokens``
    (training/resume_check.py)."""
    async_save: bool = True
    """Write checkpoints in the background: each rank copies its shards to host memory and training
    goes on while they are written; the next save (and the end of the run) first completes the
    previous one. ``false``: the step waits until the checkpoint is on disk."""


@dataclass(kw_only=True)
class MlflowConfig:
    enabled: bool = True
    experiment: str = "gptforge"
    run_name: str | None = None
    tracking_uri: str | None = None
    """Default: $MLFLOW_TRACKING_URI, else a sqlite store ``<run.dir>/mlflow.db`` (no server)."""


@dataclass(kw_only=True)
class RunConfig:
    dir: str
    """Run directory: checkpoints, metrics, MLflow store, data caches."""


@dataclass(kw_only=True)
class TokenizerConfig:
    path: str
    """A SentencePiece ``.model`` or byte-level BPE ``.json`` from ``gptforge tokenizer train``; it fixes
    the vocabulary size."""


@dataclass(kw_only=True)
class JobConfig:
    """A whole training job. ``model`` is a preset name plus optional ``GPTConfig`` field overrides."""

    run: RunConfig
    model: ModelSection
    tokenizer: TokenizerConfig | None = None
    """Required, except with ``data.mock``."""
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
