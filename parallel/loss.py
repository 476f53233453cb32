"""Language-model loss when the logits may be sharded over the vocabulary (tensor-parallel loss).

With ``loss_parallel`` the tied head leaves logits as a DTensor sharded on the vocabulary dimension and
the cross-entropy is computed without gathering them (each rank holds [B, T, V/tp]); the backward
must run inside the same context.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..model.gpt import lm_loss_sum
from .dims import ParallelDims


def loss_context(dims: ParallelDims):
    return loss_parallel() if dims.tp > 1 and dims.loss_parallel else contextlib.nullcontext()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of masked token cross-entropies; logits [B, T, V] plain or vocabulary-sharded DTensor."""
    if not isinstance(logits, DTensor):
        return lm_loss_sum(logits, labels, loss_mask)
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")  # [B*T] replicated
    return (losses.to_local() * loss_mask.flatten().to(torch.float32)).sum()


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Plain [B, T, V] logits on every rank (gathers a vocabulary-sharded DTensor)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def inference_forward(model: torch.nn.Module, dims: ParallelDims):
    """``tokens [B, T] -> logits [B, T, V]`` on every rank, for any T: under sequence parallelism the
    input is right-padded to a multiple of tp (causal attention: padding never changes earlier
    positions) and the padding's logits are dropped."""

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        pad = (-seq) % dims.tp if dims.sequence_parallel else 0
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], pad)], dim=1)
        return full_logits(model(tokens))[:, :seq]

    return forward
