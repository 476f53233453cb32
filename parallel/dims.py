"""The parallel layout of a job resolved for its world size: degrees, their validation, and the device mesh.

``ParallelDims`` is a ``ParallelConfig`` (the YAML section, same fields) whose ``dp`` is resolved and whose
values passed ``value_errors``. ``from_config`` is the trainer's resolution: it also applies
``support_errors``, what ``gptforge train`` can run. The memory planner builds ``ParallelDims`` directly: it
also plans layouts the trainer refuses (and reports why through ``from_config``).

All checks run before any process group starts and are reported together, each naming its key as ``names``
spells it: config keys (``parallel.tp``) by default, ``gptforge plan``'s flags (``--tp``) there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..model.config import GPTConfig
from .config import ParallelConfig

FSDP_STAGES = (2, 3)
ZERO_STAGES = (0, 1, 2, 3)
"""ZeRO stages: 1 shards optimizer state (and fp32 master weights), 2 also gradients, 3 also weights."""
RECOMPUTE_MODES = ("none", "selective", "full")
"""Cheapest in memory last: the planner ranks layouts in this order."""
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
FSDP_UNITS = ("block", "linear")
ZERO_ENGINES = ("fsdp", "deepspeed")
CONFIG_NAMES = {field.name: f"parallel.{field.name}" for field in dataclasses.fields(ParallelConfig)}
"""Field -> its config key, the default way errors name a value."""


def value_errors(cfg: ParallelConfig, names: Mapping[str, str] = CONFIG_NAMES) -> list[str]:
    """The range of every value of a resolved layout (the rules a config, ``gptforge plan``'s flags and
    ``ParallelDims`` share; a config's ``dp = -1`` is resolved by ``ParallelDims.from_config``)."""
    name = (lambda key: names.get(key, key))  # noqa: E731
    errors = []
    for key in ("tp", "pp", "dp", "virtual_stages", "recompute_every"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"{name(key)} must be an integer >= 1, got {value!r}")
    if cfg.zero_stage not in ZERO_STAGES:
        errors.append(f"{name('zero_stage')} must be one of 0, 1, 2, 3, got {cfg.zero_stage!r}")
    if cfg.zero_engine not in ZERO_ENGINES:
        errors.append(f"{name('zero_engine')} must be 'fsdp' or 'deepspeed', got {cfg.zero_engine!r}")
    if cfg.recompute not in RECOMPUTE_MODES:
        errors.append(f"{name('recompute')} must be one of {', '.join(RECOMPUTE_MODES)}, got {cfg.recompute!r}")
    if cfg.fsdp_unit not in FSDP_UNITS:
        errors.append(f"{name('fsdp_unit')} must be 'block' or 'linear', got {cfg.fsdp_unit!r}")
    if cfg.pp_schedule not in PP_SCHEDULES:
        errors.append(f"{name('pp_schedule')} must be 'gpipe', '1f1b' or 'interleaved-1f1b', got {cfg.pp_schedule!r}")
    return errors


@dataclass(kw_only=True, frozen=True)
class ParallelDims(ParallelConfig):
    """A layout with ``dp`` resolved (>= 1) and every value in range; field meanings in ``ParallelConfig``."""

    def __post_init__(self) -> None:
        errors = value_errors(self, {})
        if errors:
            raise ValueError("invalid parallel layout: " + "; ".join(errors))

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, errors: list[str],
                    names: Mapping[str, str] = CONFIG_NAMES) -> "ParallelDims | None":
        """The trainer's layout for ``cfg`` on ``world_size`` ranks (``dp = -1`` inferred as world_size /
        (tp x pp)): appends named errors (values, world size, then what the trainer supports) and returns
        None when there are any."""
        name = (lambda key: names.get(key, key))  # noqa: E731
        # dp = -1 is inferred below, once the degrees it is inferred from are known to be valid.
        found = value_errors(dataclasses.replace(cfg, dp=1) if cfg.dp == -1 else cfg, names)
        if found:
            errors.extend(found)
            return None
        tp, pp, dp = cfg.tp, cfg.pp, cfg.dp
        if dp == -1:
            if world_size % (tp * pp):
                errors.append(f"world size {world_size} is not divisible by {name('tp')} x {name('pp')} ({tp * pp})")
                return None
            dp = world_size // (tp * pp)
        if pp * tp * dp != world_size:
            errors.append(f"{name('pp')} ({pp}) x {name('tp')} ({tp}) x {name('dp')} ({dp}) = {pp * tp * dp} does "
                          f"not match the world size ({world_size} processes); set {name('dp')}=-1 to infer it")
            return None
        dims = cls(**(dataclasses.asdict(cfg) | {"dp": dp}))
        found = dims.support_errors(names)
        errors.extend(found)
        return None if found else dims

    def support_errors(self, names: Mapping[str, str] = CONFIG_NAMES) -> list[str]:
        """What ``gptforge train`` cannot run in this layout (engine stages, schedules, combinations)."""
        name = (lambda key: names.get(key, key))  # noqa: E731
        tp, pp, dp, zero = self.tp, self.pp, self.dp, self.zero_stage
        errors = []
        if self.zero_engine == "fsdp" and zero not in (0, *FSDP_STAGES):
            errors.append(f"{name('zero_stage')} must be 0 (DDP), 2 or 3 (FSDP2), got {zero}"
                          + (f"; ZeRO-1 needs {name('zero_engine')}=deepspeed" if zero == 1 else ""))
        if self.deepspeed and (tp > 1 or pp > 1):
            errors.append(f"{name('zero_engine')}=deepspeed shards data-parallel replicas only: it needs "
                          f"{name('tp')} = 1 and {name('pp')} = 1 (use zero_engine=fsdp to combine sharding with tp/pp)")
        if self.optimizer_offload and not self.deepspeed:
            errors.append(f"{name('optimizer_offload')} needs {name('zero_engine')}=deepspeed")
        if self.defer_grad_reduce and not self.fsdp:
            errors.append(f"{name('defer_grad_reduce')} needs FSDP ({name('zero_engine')}=fsdp with "
                          f"{name('zero_stage')} 2 or 3), got {name('zero_engine')}={self.zero_engine} with "
                          f"{name('zero_stage')} {zero}")
        if self.fsdp_unit != "block" and not self.fsdp:
            errors.append(f"{name('fsdp_unit')} '{self.fsdp_unit}' needs FSDP ({name('zero_engine')}=fsdp with "
                          f"{name('zero_stage')} 2 or 3), got {name('zero_engine')}={self.zero_engine} with "
                          f"{name('zero_stage')} {zero}")
        if self.pp_schedule == "interleaved-1f1b" and self.virtual_stages < 2:
            errors.append(f"{name('pp_schedule')} 'interleaved-1f1b' needs {name('virtual_stages')} >= 2")
        if self.pp_schedule != "interleaved-1f1b" and self.virtual_stages > 1:
            errors.append(f"{name('virtual_stages')} > 1 needs {name('pp_schedule')} 'interleaved-1f1b', "
                          f"got {self.pp_schedule!r}")
        if self.virtual_stages > 1 and pp == 1:
            errors.append(f"{name('virtual_stages')} > 1 needs {name('pp')} > 1")
        if self.sequence_parallel and tp == 1:
            errors.append(f"{name('sequence_parallel')} needs {name('tp')} > 1")
        if tp > 1 and dp > 1 and zero == 0 and pp == 1 and self.zero_engine == "fsdp":
            errors.append(f"{name('tp')} > 1 with {name('dp')} > 1 needs {name('zero_stage')} 2 or 3 (FSDP2 takes "
                          "tensor-parallel parameters; DDP does not)")
        return errors

    def validate_model(self, model: GPTConfig, seq_len: int) -> list[str]:
        """Shape constraints of this layout on a model (each error names the keys involved)."""
        errors = []
        if model.n_head % self.tp:
            errors.append(f"model.n_head ({model.n_head}) must be divisible by parallel.tp ({self.tp})")
        if model.ffn_dim % self.tp:
            errors.append(f"model FFN size ({model.ffn_dim}) must be divisible by parallel.tp ({self.tp})")
        if model.padded_vocab_size % self.tp:
            errors.append(f"padded vocabulary ({model.padded_vocab_size}) must be divisible by parallel.tp "
                          f"({self.tp}); change model.pad_vocab_multiple")
        stages = self.pp * self.virtual_stages
        if model.n_layer < stages:
            errors.append(f"model.n_layer ({model.n_layer}) must be >= parallel.pp x parallel.virtual_stages ({stages})")
        if self.sequence_parallel and seq_len % self.tp:
            errors.append(f"train.seq_len ({seq_len}) must be divisible by parallel.tp ({self.tp}) "
                          f"with parallel.sequence_parallel")
        return errors

    def precision_errors(self, precision: str) -> list[str]:
        """Compute precisions this layout cannot train in (``train.precision``)."""
        errors = []
        if self.pp > 1 and precision == "fp16":
            errors.append("train.precision fp16 with parallel.pp > 1 is not supported; use bf16 or fp32")
        if self.fsdp and precision == "fp16":
            errors.append("train.precision fp16 with parallel.zero_stage 2/3 (FSDP2) is not supported: its dynamic "
                          "loss scaling does not cover sharded gradients; use bf16")
        return errors

    def micro_batch_errors(self, smallest_micro_batches: int) -> list[str]:
        """1F1B schedules need at least pp micro-batches per data-parallel rank in every step;
        ``smallest_micro_batches`` is the count of the smallest step (the start of a batch ramp)."""
        if self.pp > 1 and self.pp_schedule != "gpipe" and smallest_micro_batches < self.pp:
            return [f"parallel.pp_schedule {self.pp_schedule!r} needs at least parallel.pp ({self.pp}) micro-batches "
                    f"per step, got {smallest_micro_batches} (at the start of the batch ramp: "
                    f"train.global_batch_size or optim.batch_ramp_start_tokens / seq_len, divided by "
                    f"train.micro_batch_size x dp); use more micro-batches or 'gpipe'"]
        return []

    def build_mesh(self, device_type: str):
        """A 3-D DeviceMesh ("pp", "dp", "tp") over the default process group: tp innermost (fastest
        links, same node), pp outermost."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))

    @property
    def fsdp(self) -> bool:
        return self.zero_engine == "fsdp" and self.zero_stage in FSDP_STAGES

    @property
    def deepspeed(self) -> bool:
        return self.zero_engine == "deepspeed"
