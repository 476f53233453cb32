"""The GPT model: plain PyTorch, no parallelism inside.

Parallelism (tensor, sequence, pipeline, data) is applied from the outside by ``gptforge.parallel`` by
module name, so names here are part of the contract: ``tok_embeddings``, ``pos_embeddings``,
``blocks.{i}.{ln_1,attn.{wq,wk,wv,wo},ln_2,mlp.{fc_in,fc_out}}``, ``norm``, ``lm_head``. The output
projection (``lm_head``) is tied to ``tok_embeddings.weight`` (GPT-2/3).

Build pattern: the constructor initialises nothing. One process calls ``init_weights(seed)``
(``build_model``); parallel runs construct under ``torch.device("meta")``, lay out and ``to_empty`` in
``gptforge.parallel`` (parallel/apply.py), which initialises each parameter by the same ``init_rule`` and
(seed, name) generator, so both give the same values.

Inference: ``forward_cached(tokens, cache, start_pos)`` runs the same blocks over only the new tokens,
reading and extending a ``KVCache`` of earlier keys and values (one process, unsharded model: load a
checkpoint of any layout with ``gptforge.training.trained_model.load_trained_model``). Training and the
parallel code never touch it: ``forward`` and the module names stay as above.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig


class LayerKV:
    """Keys and values of one attention layer for positions [0, capacity) of a batch."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys  # [B, H, capacity, Dh]
        self.values = values  # [B, H, capacity, Dh]

    def write(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, Dh] at positions [start_pos, start_pos + T); return the keys and values
        of every position up to there, [B, H, start_pos + T, Dh] each."""
        end = start_pos + k.shape[2]
        self.keys[:, :, start_pos:end] = k
        self.values[:, :, start_pos:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer, so that each generated token costs one position's forward
    instead of the whole sequence's. Preallocated to ``capacity`` positions (at most the context: the
    position embeddings end there); positions [0, ``length``) hold valid entries."""

    def __init__(self, layers: list[LayerKV], *, length: int = 0) -> None:
        self.layers = layers
        self.length = length

    @classmethod
    def allocate(cls, config: GPTConfig, *, batch_size: int, capacity: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``capacity`` positions (default: the context)."""
        capacity = config.context_length if capacity is None else capacity
        if not 1 <= capacity <= config.context_length:
            raise ValueError(f"KV cache capacity must be in [1, model.context_length={config.context_length}], "
                             f"got {capacity}")
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, config.n_head, capacity, config.head_dim)  # [B, H, capacity, Dh]

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        return cls([LayerKV(zeros(), zeros()) for _ in range(config.n_layer)])

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def repeat(self, batch_size: int) -> KVCache:
        """A new cache of ``batch_size`` rows, each a copy of this batch-1 cache: a prompt is prefilled
        once and then continued as several independent sequences."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 KV cache can be repeated, this one has {self.batch_size} rows")
        return KVCache([LayerKV(kv.keys.repeat(batch_size, 1, 1, 1), kv.values.repeat(batch_size, 1, 1, 1))
                        for kv in self.layers], length=self.length)


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
        self.dropout_rng: Callable[[], ContextManager] = contextlib.nullcontext
        """Context in which the attention-probability dropout draws its mask: the default generator
        here; with heads split over tensor-parallel ranks, gptforge.parallel installs a generator per
        rank (parallel/rng.py), since each rank's heads need masks of their own."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        """Scaled dot-product attention with dropout on the probabilities in training; q [B, H, T, Dh],
        k, v [B, H, S, Dh] -> [B, H, T, Dh]. The dropout mask is drawn inside the kernel, from whichever
        generator ``dropout_rng`` makes current."""
        dropout_p = self.dropout if self.training else 0.0
        with self.dropout_rng():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)

    def _attend_banded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A sparse layer's banded causal attention, q, k, v [B, H, T, Dh]. An explicit mask takes SDPA off
        its flash kernel (to the T x T math path); compiled on CUDA without attention dropout (flex
        attention has none) it runs as a flex-attention kernel that skips the blocks outside the band."""
        seq = q.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if q.device.type == "cuda" and dropout_p == 0.0 and torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import flex_attention

            return flex_attention(q, k, v, block_mask=banded_block_mask(seq, self.local_window, q.device))
        return self._attend(q, k, v, banded_causal_mask(seq, self.local_window, q.device), is_causal=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, _ = x.shape  # x: [B, T, D]
        # Heads derived from the (possibly tensor-parallel, hence local) projection width.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape  # x: [B, T, D]
        q, k, v = self._qkv(x)  # [B, H, T, Dh] each
        if self.local_window is None:
            out = self._attend(q, k, v, None, is_causal=True)
        else:
            out = self._attend_banded(q, k, v)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # [B, T, D]
        return self.wo(out)

    def forward_cached(self, x: torch.Tensor, kv: LayerKV, start_pos: int) -> torch.Tensor:
        """x [B, T, D] holds positions [start_pos, start_pos + T); earlier positions come from ``kv``,
        which is extended by these T. Same masks as ``forward``: causal, banded on sparse layers."""
        bsz, seq, _ = x.shape  # x: [B, T, D]
        q, k, v = self._qkv(x)  # [B, H, T, Dh] each
        keys, values = kv.write(start_pos, k, v)  # [B, H, start_pos + T, Dh] each
        mask = offset_causal_mask(start_pos, seq, self.local_window, x.device)  # [T, start_pos + T]
        out = self._attend(q, keys, values, mask, is_causal=False)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # [B, T, D]
        return self.wo(out)


def banded_mask_mod(window: int):
    """Flex attention's form of ``banded_causal_mask``: may query ``q`` attend key ``k``."""

    def mask_mod(b, h, q, k):
        return (k <= q) & (q - k < window)

    return mask_mod


def banded_block_mask(seq: int, window: int, device: torch.device):
    """The flex-attention block mask of a [T, T] band: which 128 x 128 blocks hold any of the band, a
    small index built inside the compiled block (a cached one would be a graph break)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(banded_mask_mod(window), None, None, seq, seq, device=device)


def banded_causal_mask(seq: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] boolean mask, True where query i may attend key j: i - window < j <= i."""
    idx = torch.arange(seq, device=device)
    diff = idx[:, None] - idx[None, :]  # [T, T] = i - j
    return (diff >= 0) & (diff < window)


def offset_causal_mask(start_pos: int, seq: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[T, start_pos + T] boolean mask for queries at positions start_pos..start_pos+T-1 over keys at
    0..start_pos+T-1: True where key j <= query i, and i - window < j when ``window`` is set."""
    query = torch.arange(start_pos, start_pos + seq, device=device)
    key = torch.arange(start_pos + seq, device=device)
    diff = query[:, None] - key[None, :]  # [T, start_pos + T] = i - j
    allowed = diff >= 0
    return allowed & (diff < window) if window is not None else allowed


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
        self.resid_dropout_rng: Callable[[], ContextManager] = contextlib.nullcontext
        """Context in which the residual dropout draws its masks: the default generator here (a
        residual stream every rank holds whole must get the same mask on every rank); with the stream
        split along the sequence over tensor-parallel ranks, gptforge.parallel installs a generator
        per rank (parallel/rng.py), since each rank's positions need masks of their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x, self.attn)

    def forward_cached(self, x: torch.Tensor, kv: LayerKV, start_pos: int) -> torch.Tensor:
        """x [B, T, D] at positions [start_pos, start_pos + T), attending to the cached earlier ones."""
        return self._residual(x, lambda h: self.attn.forward_cached(h, kv, start_pos))

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        with self.resid_dropout_rng():
            return self.resid_dropout(h)

    def _residual(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # One residual layout for training and cached inference, so the two cannot drift apart.
        if self.pre_norm:  # GPT-2/3: LayerNorm at the input of each sub-block
            x = x + self._dropout(attend(self.ln_1(x)))
            return x + self._dropout(self.mlp(self.ln_2(x)))
        # GPT-1: LayerNorm after each residual add
        x = self.ln_1(x + self._dropout(attend(x)))
        return self.ln_2(x + self._dropout(self.mlp(x)))


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

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, start_pos: int, *,
                       last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions [start_pos, start_pos + T) -> logits [B, T, padded_vocab] (or
        [B, 1, padded_vocab] for the last position with ``last_only``), equal to the matching rows of
        ``forward`` over the whole sequence. Positions before start_pos come from ``cache``; these T are
        written into it (overwriting anything from start_pos on) and ``cache.length`` becomes
        start_pos + T."""
        bsz, seq = tokens.shape
        if bsz != cache.batch_size:
            raise ValueError(f"forward_cached: {bsz} sequences but the KV cache holds {cache.batch_size}")
        if not 0 <= start_pos <= cache.length:
            raise ValueError(f"forward_cached: start_pos {start_pos} must be in [0, cache.length={cache.length}] "
                             f"(positions before it must already be cached)")
        if start_pos + seq > cache.capacity:
            raise ValueError(f"forward_cached: positions up to {start_pos + seq} exceed the KV cache capacity "
                             f"{cache.capacity} (at most model.context_length {self.config.context_length})")
        positions = torch.arange(start_pos, start_pos + seq, device=tokens.device)  # [T]
        x = self.embed(tokens, positions)  # [B, T, D]
        for name, block in self.blocks.items():
            x = block.forward_cached(x, cache.layers[int(name)], start_pos)
        cache.length = start_pos + seq
        if last_only:  # the final norm and the head act per position: only the last one is needed
            x = x[:, -1:]  # [B, 1, D]
        if self.norm is not None:
            x = self.norm(x)
        return self.lm_head(x, self.tok_embeddings.weight)


INIT_BLOCK_ELEMENTS = 2**18
"""Random initialisation is drawn in blocks of whole rows of about this many elements (1 MiB of fp32),
each from its own (seed, name, block) generator, so any rank can produce any slice of a parameter
while drawing only the rows it holds (parallel/ initialises each rank's shard this way)."""


def param_generator(seed: int, name: str, device: torch.device, block: int = 0) -> torch.Generator:
    """A generator whose stream depends only on the run seed, the parameter's name and the row block."""
    digest = zlib.crc32(name.encode("utf-8"))
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + digest + block * 7_919) % (2**63))


def rows_per_block(shape: tuple[int, ...] | torch.Size) -> int:
    row = math.prod(shape[1:]) if len(shape) > 1 else 1  # a 1-D tensor is a column of one-element rows
    return max(1, INIT_BLOCK_ELEMENTS // max(row, 1))


@torch.no_grad()
def init_slice_(out: torch.Tensor, rule: tuple[str, float], seed: int, name: str,
                full_shape: tuple[int, ...] | torch.Size, offsets: tuple[int, ...] | None = None) -> None:
    """Fill ``out`` with the values that the full tensor of ``full_shape`` has at ``out``'s region,
    which starts at ``offsets`` (one per dimension; zeros: the whole tensor, or its leading corner).
    Only the row blocks that intersect the region are drawn: memory beyond ``out`` is one block."""
    kind, std = rule
    if kind == "zeros":
        out.zero_()
        return
    if kind == "ones":
        out.fill_(1.0)
        return
    full_shape = tuple(full_shape)
    offsets = tuple(offsets) if offsets is not None else (0,) * len(full_shape)
    if out.numel() == 0:
        return
    per_block = rows_per_block(full_shape)
    row_lo, row_hi = offsets[0], offsets[0] + out.shape[0]
    rest = tuple(slice(o, o + n) for o, n in zip(offsets[1:], out.shape[1:]))
    for block in range(row_lo // per_block, (row_hi - 1) // per_block + 1):
        b_lo, b_hi = block * per_block, min((block + 1) * per_block, full_shape[0])
        values = torch.empty((b_hi - b_lo,) + full_shape[1:], dtype=out.dtype, device=out.device)
        values.normal_(mean=0.0, std=std, generator=param_generator(seed, name, out.device, block))
        lo, hi = max(b_lo, row_lo), min(b_hi, row_hi)
        out[lo - row_lo:hi - row_lo].copy_(values[(slice(lo - b_lo, hi - b_lo),) + rest])


@torch.no_grad()
def init_flat_range_(out: torch.Tensor, rule: tuple[str, float], seed: int, name: str,
                     full_shape: tuple[int, ...] | torch.Size, start: int) -> None:
    """Fill the 1-D ``out`` with elements [start, start + out.numel()) of the flattened full tensor
    (a ZeRO partition of a flattened parameter), drawing only the rows it touches."""
    kind, _ = rule
    if kind != "normal" or out.numel() == 0:
        init_slice_(out, rule, seed, name, (out.numel(),))
        return
    full_shape = tuple(full_shape)
    row = math.prod(full_shape[1:]) if len(full_shape) > 1 else 1
    first, last = start // row, (start + out.numel() - 1) // row
    rows = torch.empty((last - first + 1,) + full_shape[1:], dtype=out.dtype, device=out.device)
    init_slice_(rows, rule, seed, name, full_shape, (first,) + (0,) * (len(full_shape) - 1))
    lo = start - first * row
    out.copy_(rows.reshape(-1)[lo:lo + out.numel()])


@torch.no_grad()
def init_tensor_(tensor: torch.Tensor, rule: tuple[str, float], seed: int, name: str) -> None:
    """Fill ``tensor`` (a full, unsharded tensor) by ``rule`` with the (seed, name) generators."""
    init_slice_(tensor, rule, seed, name, tensor.shape)


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
