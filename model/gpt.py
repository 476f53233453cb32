"""The GPT model: plain PyTorch, no parallelism inside.

Parallelism (tensor, sequence, pipeline, data) is applied from the outside by ``gptforge.parallel`` by
module name, so names here are part of the contract: ``tok_embeddings``, ``pos_embeddings``,
``blocks.{i}.{ln_1,attn.{wq,wk,wv,wo},ln_2,mlp.{fc_in,fc_out}}``, ``norm``, ``lm_head``. The output
projection (``lm_head``) is tied to ``tok_embeddings.weight`` (GPT-2/3).

Build pattern (large models): construct under ``torch.device("meta")``, parallelize, ``to_empty``, then
``init_weights()``; the constructor does not initialise anything by itself.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model.config import GPTConfig


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        # Separate q/k/v projections (not one fused matrix) so a column-wise tensor-parallel split
        # gives each rank whole heads of q, k and v.
        self.wq = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.wk = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.wv = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.wo = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.local_window = config.local_window if config.is_sparse_layer(layer) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape  # x: [B, T, D]
        # Heads derived from the (possibly tensor-parallel, hence local) projection width.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if self.local_window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=banded_causal_mask(seq, self.local_window, x.device), dropout_p=dropout_p
            )
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # [B, T, D]
        return self.wo(out)


def banded_causal_mask(seq: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] boolean mask, True where query i may attend key j: i - window < j <= i."""
    idx = torch.arange(seq, device=device)
    diff = idx[:, None] - idx[None, :]  # [T, T] = i - j
    return (diff >= 0) & (diff < window)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.fc_out = nn.Linear(config.ffn_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximated GELU, as in the released GPT-2 (and GPT-1's gelu).
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:  # GPT-2/3: LayerNorm at the input of each sub-block
            x = x + self.resid_dropout(self.attn(self.ln_1(x)))
            return x + self.resid_dropout(self.mlp(self.ln_2(x)))
        # GPT-1: LayerNorm after each residual add
        x = self.ln_1(x + self.resid_dropout(self.attn(x)))
        return self.ln_2(x + self.resid_dropout(self.mlp(x)))


class TiedHead(nn.Module):
    """Output projection tied to the token embedding, logits = h E^T; no parameters of its own (a module
    so that parallel/ can lay out its inputs and output)."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight)  # [B, T, D] x [V, D]^T -> [B, T, V]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.pos_embeddings = nn.Embedding(config.context_length, config.d_model)
        self.emb_dropout = nn.Dropout(config.dropout)
        # A ModuleDict keyed "0".."L-1" keeps fully-qualified names stable when pipeline stages drop layers.
        self.blocks = nn.ModuleDict({str(i): Block(config, i) for i in range(config.n_layer)})
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
            if config.final_norm
            else None
        )
        self.lm_head = TiedHead()

    def init_rule(self, name: str) -> tuple[str, float]:
        """How parameter ``name`` is initialised: ("normal", std), ("ones", 0) or ("zeros", 0).

        N(0, init_std) weights (GPT-1 section 4.1), zero biases, unit LayerNorm gains; residual output
        projections N(0, init_std / sqrt(2 n_layer)) when ``scale_residual_init`` (GPT-2 section 2.3:
        N = 2 residual layers per block)."""
        cfg = self.config
        if name.endswith(".bias"):
            return "zeros", 0.0
        module = self.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.LayerNorm):
            return "ones", 0.0
        if name.endswith(("attn.wo.weight", "mlp.fc_out.weight")) and cfg.scale_residual_init:
            return "normal", cfg.init_std / math.sqrt(2 * cfg.n_layer)
        return "normal", cfg.init_std

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from a generator seeded by (seed, parameter name), so a parameter's
        values do not depend on the order of construction, and ``gptforge.parallel`` can produce the same
        values for any sharding of it."""
        for name, param in self.named_parameters():
            init_tensor_(param, self.init_rule(name), seed, name)

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> token + position embeddings, after dropout [B, T, D]."""
        seq = tokens.shape[1]
        if seq > self.config.context_length:
            raise ValueError(f"sequence length {seq} exceeds model.context_length {self.config.context_length}")
        if position_ids is None:
            position_ids = torch.arange(seq, device=tokens.device)  # [T], broadcast over the batch
        return self.emb_dropout(self.tok_embeddings(tokens) + self.pos_embeddings(position_ids))

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, D] (after the final LayerNorm if any)."""
        x = self.embed(tokens, position_ids)  # [B, T, D]
        for block in self.blocks.values():
            x = block(x)
        return self.norm(x) if self.norm is not None else x

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, padded_vocab]. Columns >= vocab_size are padding."""
        h = self.hidden_states(tokens, position_ids)
        return self.lm_head(h, self.tok_embeddings.weight)


def param_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on the run seed and the parameter's name."""
    digest = zlib.crc32(name.encode("utf-8"))
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + digest) % (2**63))


@torch.no_grad()
def init_tensor_(tensor: torch.Tensor, rule: tuple[str, float], seed: int, name: str) -> None:
    """Fill ``tensor`` (a full, unsharded tensor) by ``rule`` with the (seed, name) generator."""
    kind, std = rule
    if kind == "zeros":
        tensor.zero_()
    elif kind == "ones":
        tensor.fill_(1.0)
    else:
        tensor.normal_(mean=0.0, std=std, generator=param_generator(seed, name, tensor.device))


def build_model(config: GPTConfig, device: torch.device | str = "cpu", seed: int = 0) -> GPT:
    """Construct on ``device`` and initialise (the single-process path; parallel/ uses meta + to_empty)."""
    with torch.device(device):
        model = GPT(config)
    model.init_weights(seed)
    return model


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token cross-entropies (fp32). logits [B, T, V], labels [B, T], loss_mask [B, T] of 0/1.

    Returned as a sum so gradient accumulation can divide by the tokens of the whole global batch."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")  # [B*T]
    if loss_mask is not None:
        losses = losses * loss_mask.flatten().to(losses.dtype)
    return losses.sum()
