"""The console lines of a run (rank 0): the model and layout at the start, then the logged steps."""

from __future__ import annotations

import math

import torch

from .base import Callback


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameter values stored on this rank: a DTensor (tensor-parallel or FSDP) counts its local shard."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def is_log_step(trainer, record: dict) -> bool:
    """Steps printed and tracked: every ``train.log_interval``, the last one, and validation steps."""
    step = record["step"]
    return step % trainer.t.log_interval == 0 or step == trainer.t.max_steps or "val_loss" in record


class ConsoleLog(Callback):
    def on_train_start(self, trainer) -> None:
        dims, info, fpt, device_name = trainer.dims, trainer.info, trainer.flops_per_token, trainer.device_name
        trainer.log(
            f"model {trainer.cfg.model.preset}: {trainer.n_params['total']:,} parameters; {fpt / 1e6:.2f} MFLOPs/token; "
            f"{info.world_size} rank(s) on {info.device}{' (' + device_name + ')' if device_name else ''}; "
            f"pp {dims.pp} x dp {dims.dp} x tp {dims.tp}{' (sequence parallel)' if dims.sequence_parallel else ''}, "
            f"zero stage {dims.zero_stage}" + (f", {dims.pp_schedule} schedule" if dims.pp > 1 else ""))
        if trainer.engine is None:  # what sharding left on this rank (DeepSpeed keeps its partitions out of sight)
            trainer.log(f"rank 0 holds {local_parameter_count(trainer.model):,} parameter values")

    def on_step_end(self, trainer, record: dict) -> None:
        step, loss = record["step"], record["loss"]
        if not math.isfinite(loss):
            trainer.log(f"step {step}: loss is {loss}")
        if not is_log_step(trainer, record):
            return
        msg = (f"step {step:>6}/{trainer.t.max_steps} loss {loss:.4f} lr {record['lr']:.3e} "
               f"gnorm {record['grad_norm']:.3f} batch {record['batch_size']} {record['tokens_per_s']:,.0f} tok/s")
        if "mfu" in record:
            msg += f" mfu {record['mfu']:.1%}"
        if "val_loss" in record:
            msg += f" | val loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
        trainer.log(msg)
