"""The parallel layout of a job: degrees, their validation, and the device mesh.

All checks run before any process group starts and are reported together, each naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import GPTConfig

FSDP_STAGES = (2, 3)


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    tp: int
    """Tensor-parallel degree (Megatron-style column/row splits, applied with DTensor)."""
    dp: int
    """Data-parallel degree (replicas, or shards under ZeRO-2/3)."""
    pp: int = 1
    """Pipeline-parallel degree: the layers split into pp x virtual_stages stages."""
    virtual_stages: int = 1
    """Stages per pipeline rank (> 1 for the interleaved 1F1B schedule)."""
    pp_schedule: str = "1f1b"
    """``gpipe``, ``1f1b`` or ``interleaved-1f1b``."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout regions along the sequence over the tensor-parallel ranks."""
    zero_stage: int = 0
    """0: DDP replicas; 2: FSDP2, parameters kept gathered between forward and backward (ZeRO-2 like);
    3: FSDP2, parameters resharded after forward (ZeRO-3 like). With ``zero_engine: deepspeed``:
    DeepSpeed's ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)."""
    zero_engine: str = "fsdp"
    """Who shards for zero_stage > 0: ``fsdp`` (FSDP2; composes with tp and pp) or ``deepspeed``."""
    optimizer_offload: bool = False
    """DeepSpeed only: keep optimizer state and fp32 master weights on the CPU."""
    loss_parallel: bool = True
    """With tp > 1: cross-entropy on vocabulary-sharded logits, never gathering [B, T, V]."""
    recompute: str = "none"
    """Activation checkpointing: ``none``, ``full`` (every block) or ``selective`` (every
    ``recompute_every``-th block): recomputed in backward instead of stored."""
    recompute_every: int = 2

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @classmethod
    def resolve(cls, *, tp: int, dp: int, sequence_parallel: bool, zero_stage: int, world_size: int,
                errors: list[str], loss_parallel: bool = True, recompute: str = "none",
                recompute_every: int = 2, pp: int = 1, virtual_stages: int = 1,
                pp_schedule: str = "1f1b", zero_engine: str = "fsdp",
                optimizer_offload: bool = False) -> "ParallelDims | None":
        """``dp = -1`` is inferred as world_size / (tp x pp). Appends named errors and returns None when invalid."""
        start = len(errors)
        if tp < 1:
            errors.append(f"parallel.tp must be >= 1, got {tp}")
        if pp < 1:
            errors.append(f"parallel.pp must be >= 1, got {pp}")
        if virtual_stages < 1:
            errors.append(f"parallel.virtual_stages must be >= 1, got {virtual_stages}")
        if pp_schedule not in ("gpipe", "1f1b", "interleaved-1f1b"):
            errors.append(f"parallel.pp_schedule must be 'gpipe', '1f1b' or 'interleaved-1f1b', got {pp_schedule!r}")
        if dp == 0 or dp < -1:
            errors.append(f"parallel.dp must be >= 1 or -1 (inferred), got {dp}")
        if zero_engine not in ("fsdp", "deepspeed"):
            errors.append(f"parallel.zero_engine must be 'fsdp' or 'deepspeed', got {zero_engine!r}")
        elif zero_engine == "fsdp" and zero_stage not in (0, *FSDP_STAGES):
            errors.append(f"parallel.zero_stage must be 0 (DDP), 2 or 3 (FSDP2), got {zero_stage}"
                          + ("; ZeRO-1 needs parallel.zero_engine=deepspeed" if zero_stage == 1 else ""))
        elif zero_engine == "deepspeed" and zero_stage not in (0, 1, 2, 3):
            errors.append(f"parallel.zero_stage must be 0-3 with DeepSpeed, got {zero_stage}")
        if zero_engine == "deepspeed" and (tp > 1 or pp > 1):
            errors.append("parallel.zero_engine=deepspeed shards data-parallel replicas only: it needs parallel.tp = 1 "
                          "and parallel.pp = 1 (use zero_engine=fsdp to combine sharding with tp/pp)")
        if optimizer_offload and zero_engine != "deepspeed":
            errors.append("parallel.optimizer_offload needs parallel.zero_engine=deepspeed")
        if recompute not in ("none", "full", "selective"):
            errors.append(f"parallel.recompute must be 'none', 'full' or 'selective', got {recompute!r}")
        if recompute_every < 1:
            errors.append(f"parallel.recompute_every must be >= 1, got {recompute_every}")
        if len(errors) > start:
            return None
        if dp == -1:
            if world_size % (tp * pp):
                errors.append(f"world size {world_size} is not divisible by parallel.tp x parallel.pp ({tp * pp})")
                return None
            dp = world_size // (tp * pp)
        if pp * tp * dp != world_size:
            errors.append(f"parallel.pp ({pp}) x parallel.tp ({tp}) x parallel.dp ({dp}) = {pp * tp * dp} does not "
                          f"match the world size ({world_size} processes); set parallel.dp=-1 to infer it")
            return None
        if pp_schedule == "interleaved-1f1b" and virtual_stages < 2:
            errors.append("parallel.pp_schedule 'interleaved-1f1b' needs parallel.virtual_stages >= 2")
        if pp_schedule != "interleaved-1f1b" and virtual_stages > 1:
            errors.append(f"parallel.virtual_stages > 1 needs parallel.pp_schedule 'interleaved-1f1b', got {pp_schedule!r}")
        if virtual_stages > 1 and pp == 1:
            errors.append("parallel.virtual_stages > 1 needs parallel.pp > 1")
        if sequence_parallel and tp == 1:
            errors.append("parallel.sequence_parallel needs parallel.tp > 1")
        if tp > 1 and dp > 1 and zero_stage == 0 and pp == 1 and zero_engine == "fsdp":
            errors.append("parallel.tp > 1 with parallel.dp > 1 needs parallel.zero_stage 2 or 3 (FSDP2 takes "
                          "tensor-parallel parameters; DDP does not)")
        if len(errors) > start:
            return None
        return cls(tp=tp, dp=dp, pp=pp, virtual_stages=virtual_stages, pp_schedule=pp_schedule,
                   sequence_parallel=sequence_parallel, zero_stage=zero_stage, loss_parallel=loss_parallel,
                   recompute=recompute, recompute_every=recompute_every, zero_engine=zero_engine,
                   optimizer_offload=optimizer_offload)

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
