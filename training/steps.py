"""One training step and one validation pass, for a plain, tensor/data-parallel or pipelined model.

Losses are sums of token cross-entropies divided by the tokens of the whole global batch, so
gradient accumulation, data parallelism and pipeline micro-batches all give the gradient of the
global mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from ..parallel.apply import no_grad_sync
from ..parallel.dims import ParallelDims
from ..parallel.distributed import all_reduce_
from ..parallel.loss import loss_context, token_loss_sum
from ..parallel.pipeline import PipelineRunner


@dataclass(kw_only=True)
class StepContext:
    module: torch.nn.Module
    """What to call for a forward (the model, or its DDP wrapper / compiled form)."""
    model: torch.nn.Module
    """The (rank) model: parameters, optimizer, checkpoints."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dims: ParallelDims
    device: torch.device
    autocast_precision: str
    grad_clip: float
    dp_group: object
    pipeline: PipelineRunner | None = None
    engine: object | None = None
    """A DeepSpeed engine (ZeRO via DeepSpeed): it owns reduction, clipping and the optimizer step."""


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(ctx: StepContext, batches: list[dict], global_tokens: torch.Tensor, lr: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward all micro-batches (on the device), clip, optimizer step. ``global_tokens`` is the
    loss tokens of the whole global batch, a device tensor. Returns (loss sum of this rank's tokens,
    global grad norm) as device tensors: nothing here waits for the GPU (``step_loss`` reads them)."""
    scale = (ctx.dims.dp / global_tokens.double()).float()  # 0-dim; the loss is per global token
    if ctx.engine is not None:
        return _deepspeed_step(ctx, batches, scale, lr)
    if ctx.pipeline is not None:
        loss_sum, grad_norm = _pipeline_step(ctx, batches, scale, lr)
    else:
        loss_sum, grad_norm = _accumulate_step(ctx, batches, scale, lr)
    ctx.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _deepspeed_step(ctx: StepContext, batches: list[dict], scale: torch.Tensor, lr: float):
    from ..parallel import deepspeed_engine

    engine = ctx.engine
    micro = batches[0]["tokens"].shape[0]
    deepspeed_engine.set_batch(engine, len(batches) * micro * ctx.dims.dp)
    deepspeed_engine.set_lr(engine, lr)
    loss_sum = torch.zeros((), device=ctx.device)
    for mb in batches:
        x, y, mask = (mb[k].to(ctx.device) for k in ("tokens", "labels", "loss_mask"))  # each [b, T]
        summed = token_loss_sum(engine(x), y, mask)
        # The engine averages gradients over dp ranks; our loss is already per global token.
        engine.backward(summed * scale, scale_wrt_gas=False)
        engine.step()  # applies the update (clip, optimizer, zero grads) at the last micro-batch only
        loss_sum += summed.detach()
    return loss_sum, torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float32, device=ctx.device)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a replicated norm), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _accumulate_step(ctx: StepContext, batches: list[dict], scale: torch.Tensor, lr: float):
    loss_sum = torch.zeros((), device=ctx.device)
    for i, mb in enumerate(batches):
        x, y, mask = (mb[k].to(ctx.device) for k in ("tokens", "labels", "loss_mask"))  # each [b, T]
        last = i == len(batches) - 1
        # DDP (and FSDP with parallel.defer_grad_reduce) reduce gradients once per step, after the last
        # micro-batch; FSDP by default reduce-scatters after every one, so gradients stay sharded.
        sync = contextlib.nullcontext() if last else no_grad_sync(ctx.module, ctx.dims)
        with sync, loss_context(ctx.dims):
            with autocast(ctx.autocast_precision, ctx.device):
                logits = ctx.module(x)  # [b, T, V] (with loss parallel: a DTensor, [b, T, V/tp] per rank)
            summed = token_loss_sum(logits, y, mask)
            # DDP/FSDP average gradients over dp ranks: scale by dp size to get sum / global tokens.
            ctx.scaler.scale(summed * scale).backward()
        loss_sum += _full(summed.detach())
    _set_lr(ctx.optimizer, lr)
    ctx.scaler.unscale_(ctx.optimizer)
    params = list(ctx.model.parameters())
    if ctx.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    return loss_sum, _full(grad_norm)


def _pipeline_step(ctx: StepContext, batches: list[dict], scale: torch.Tensor, lr: float):
    runner = ctx.pipeline
    tokens = torch.cat([mb["tokens"] for mb in batches]).to(ctx.device)  # [B_rank, T]
    # Masked positions become ignore_index (-100) so the last stage needs only the labels.
    labels = torch.cat([mb["labels"].masked_fill(mb["loss_mask"] == 0, -100) for mb in batches]).to(ctx.device)
    with loss_context(ctx.dims), autocast(ctx.autocast_precision, ctx.device):
        scaled = runner.train_step(tokens, labels, len(batches), scale)
    runner.sync_gradients()
    runner.average_over_dp(ctx.dp_group)
    _set_lr(ctx.optimizer, lr)
    grad_norm = runner.clip_grad_norm_(ctx.grad_clip)
    ctx.optimizer.step()
    # Only the last stage saw the loss (the others hold 0): step_loss sums it along the pipeline.
    return scaled / scale, grad_norm


def step_loss(ctx: StepContext, loss_sum: torch.Tensor) -> torch.Tensor:
    """The loss sum of the whole global batch from each rank's ``train_step`` loss sum: a sum along the
    pipeline (only its last stage has one) and over data-parallel ranks, on the device."""
    total = loss_sum.detach().double()
    if ctx.pipeline is not None:
        all_reduce_(total, ctx.pipeline.ranks.pp_group)
    return all_reduce_(total, ctx.dp_group)


@torch.no_grad()
def evaluate(ctx: StepContext, dataset, n_samples: int, micro: int, dp_rank: int) -> float:
    """Mean token loss over the first ``n_samples`` validation sequences, split over data-parallel ranks.

    Every rank runs the same number of forwards (sharded parameters are gathered collectively):
    a rank with fewer sequences repeats one with zero weight."""
    dims, device = ctx.dims, ctx.device
    ctx.module.eval()
    n = min(n_samples, len(dataset))
    per_rank = -(-n // dims.dp)
    ids = [(i, 1.0) for i in range(dp_rank, n, dims.dp)]
    ids += [(0, 0.0)] * (per_rank - len(ids))
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, per_rank, micro):
        chunk = ids[start : start + micro]
        items = [dataset[i] for i, _ in chunk]
        x = torch.stack([it["tokens"] for it in items]).to(device)  # [b, T]
        y = torch.stack([it["labels"] for it in items]).to(device)
        weight = torch.tensor([w for _, w in chunk], device=device)[:, None]  # [b, 1]
        mask = torch.stack([it["loss_mask"] for it in items]).to(device) * weight
        with autocast(ctx.autocast_precision, device), loss_context(dims):
            if ctx.pipeline is None:
                total += _full(token_loss_sum(ctx.module(x), y, mask)).double()
                tokens += mask.sum().double()
            else:
                out = ctx.pipeline.forward_logits(x, lambda logits: _full(token_loss_sum(logits, y, mask)))
                if out is not None:  # the last stage
                    total += out.double()
                    tokens += mask.sum().double()
    ctx.module.train()
    sums = torch.stack([total, tokens])
    if ctx.pipeline is not None:
        all_reduce_(sums, ctx.pipeline.ranks.pp_group)
    total, tokens = all_reduce_(sums, ctx.dp_group).tolist()
    return total / max(tokens, 1.0)
