"""The console lines of a run (rank 0): the model and layout at the start, then the logged steps."""

from __future__ import annotations

import math

import torch

from .base import Callback


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameter values stored on this rank: a DTensor (tensor-parallel or FSDP) counts its local shard."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


class ConsoleLog(Callback):
    def on_train_start(self, trainer) -> None:
        dims, info, fpt, device_name = trainer.dims, trainer.info, trainer.flops_per_token, trainer.device_name
        trainer.log(
            f"model {trainer.cfg.model.preset}: {trainer.n_params['total']:,} parameters; {fpt['6n_attn'] / 1e6:.2f} MFLOPs/token; "
            f"{info.world_size} rank(s) on {info.device}{' (' + device_name + ')' if device_name else ''}; "
            f"pp {dims.pp} x dp {dims.dp} x tp {dims.tp}{' (sequence parallel)' if dims.sequence_parallel else ''}, "
            f"zero stage {dims.zero_stage}" + (f", {dims.pp_schedule} schedule" if dims.pp > 1 else "")
            + (", blocks compiled" if trainer.compile else ""))
        n = trainer.n_params["total"] - trainer.n_params["position_embedding"]
        if trainer.peak_flops:
            cfg = trainer.job.model
            trainer.log(f"MFU = FLOPs/token x tokens/s / ({trainer.peak_flops / 1e12:.1f} TFLOP/s "
                        f"{trainer.compute_precision} peak x {info.world_size} device(s)); FLOPs/token: "
                        f"6N = {fpt['6n'] / 1e6:.1f}M (N = {n:,} without position embeddings), "
                        f"6N + 12*L*d*T = {fpt['6n_attn'] / 1e6:.1f}M (L {cfg.n_layer}, d {cfg.d_model}, "
                        f"T {trainer.job.seq_len})")
        elif info.device.type == "cuda":
            trainer.log(f"no MFU: no {trainer.compute_precision} peak known for {device_name!r} "
                        f"(common/hardware.py); set train.peak_tflops")
        if trainer.engine is None:  # what sharding left on this rank (DeepSpeed keeps its partitions out of sight)
            trainer.log(f"rank 0 holds {local_parameter_count(trainer.model):,} parameter values")

    def on_step_end(self, trainer, record: dict) -> None:
        if "loss" not in record:  # not a log step: its figures stay on the device
            return
        step, loss = record["step"], record["loss"]
        if not math.isfinite(loss):
            trainer.log(f"step {step}: loss is {loss}")
        msg = (f"step {step:>6}/{trainer.t.max_steps} loss {loss:.4f} lr {record['lr']:.3e} "
               f"gnorm {record['grad_norm']:.3f} batch {record['batch_size']} {record['tokens_per_s']:,.0f} tok/s")
        if "mfu_6n" in record:
            msg += f" mfu {record['mfu_6n']:.1%} (6N) {record['mfu_6n_attn']:.1%} (6N+attn)"
        if "cuda_max_allocated_gib" in record:
            msg += (f" mem {record['cuda_max_allocated_gib']:.1f}/{record['cuda_max_reserved_gib']:.1f} GiB "
                    f"(max allocated/reserved)")
        if "val_loss" in record:
            msg += f" | val loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
        trainer.log(msg)
