"""Autoregressive sampling.

``generate``: the prompt is prefilled once into a KV cache, then each step feeds one token per
sequence; a batch of sequences continues the same prompt independently. ``sample``: the end-of-run
look at a model during training, which recomputes the window each step so that it works through any
parallel layout's ``forward``.

Both pick tokens with ``next_tokens``: temperature, then top-k, then top-p (nucleus). Padding columns
of the vocabulary (ids >= config.vocab_size) are cut off before any of that, so they are never produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..common.errors import UserError
from .gpt import GPT, KVCache


class SamplingError(UserError):
    """Every problem of a ``SamplingConfig``; ``problems`` maps each field to what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("invalid sampling settings: " + "; ".join(f"{k} {v}" for k, v in problems.items()))


@dataclass(kw_only=True)
class SamplingConfig:
    """How ``generate`` continues a prompt."""

    max_new_tokens: int = 100
    """Upper bound on new tokens per sequence; fewer when the stop token comes first or the context
    (prompt plus new tokens <= model.context_length) is full."""
    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy (argmax, and top_k / top_p do not matter)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens; None: no limit."""
    top_p: float = 1.0
    """Nucleus sampling: only the most likely tokens whose probabilities add up to top_p (the first
    token is always kept); 1.0: no limit."""
    num_sequences: int = 1
    """Independent continuations of the prompt, generated as one batch."""
    stop_token: int | None = None
    """A sequence ends when it produces this id (not included in its tokens); None: never."""

    def __post_init__(self) -> None:
        problems = {}
        for name in ("max_new_tokens", "num_sequences"):
            if getattr(self, name) < 1:
                problems[name] = f"must be >= 1, got {getattr(self, name)}"
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails both
            problems["temperature"] = f"must be >= 0 (0 = greedy), got {self.temperature}"
        if self.top_k is not None and self.top_k < 1:
            problems["top_k"] = f"must be >= 1, got {self.top_k}"
        if not 0 < self.top_p <= 1:
            problems["top_p"] = f"must be in (0, 1], got {self.top_p}"
        if self.stop_token is not None and self.stop_token < 0:
            problems["stop_token"] = f"must be a token id >= 0, got {self.stop_token}"
        if problems:
            raise SamplingError(problems)


FinishReason = Literal["stop", "length", "context"]
"""Why a sequence ended: its stop token, max_new_tokens, or the model's context was full."""


@dataclass(kw_only=True)
class Generation:
    """The continuations of one prompt."""

    prompt_tokens: int
    sequences: list[list[int]]
    """New token ids of each sequence (the stop token left out)."""
    finish_reasons: list[FinishReason]


def check_prompt(prompt: list[int], model: GPT) -> None:
    """ValueError unless ``prompt`` is a non-empty list of real token ids that leaves room in the
    context for at least one new token."""
    cfg = model.config
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) >= cfg.context_length:
        raise ValueError(f"the prompt is {len(prompt)} tokens long, but the model's context is {cfg.context_length} "
                         f"tokens and must hold the prompt plus at least one new token: shorten it to at most "
                         f"{cfg.context_length - 1} tokens")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"the prompt holds token ids outside the model's vocabulary [0, {cfg.vocab_size}): "
                         f"{bad[:5]} (was it encoded with another tokenizer?)")


def filter_logits(logits: torch.Tensor, *, top_k: int | None, top_p: float) -> torch.Tensor:
    """logits [N, V] -> the same with every token outside the top-k and then the top-p nucleus at -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)  # [N, V]
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [N, V] each
        # Drop a token once the more likely ones already hold top_p of the mass; the most likely token
        # has nothing before it, so it always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p  # [N, V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, V] over the real vocabulary (fp32) -> one token id per row [N]."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: GPT, prompt: list[int], settings: SamplingConfig,
             generator: torch.Generator | None = None) -> Generation:
    """Continue ``prompt`` as ``settings.num_sequences`` sequences with a KV cache (single process,
    unsharded model). ``generator`` (on the model's device) makes the draws reproducible."""
    check_prompt(prompt, model)
    cfg = model.config
    param = next(model.parameters())
    # Prompt plus new tokens must fit the learned position embeddings.
    limit = min(settings.max_new_tokens, cfg.context_length - len(prompt))
    n = settings.num_sequences
    was_training = model.training
    model.eval()
    try:
        # The last new token is never fed back, so the cache needs one position less than the text.
        cache = KVCache.allocate(cfg, batch_size=1, capacity=len(prompt) + limit - 1, device=param.device,
                                 dtype=param.dtype)
        ids = torch.tensor([prompt], dtype=torch.long, device=param.device)  # [1, P]
        logits = model.forward_cached(ids, cache, 0, last_only=True)[:, -1]  # [1, V_padded]
        cache = cache.repeat(n)
        logits = logits.expand(n, -1)  # [N, V_padded]
        out = torch.zeros(n, limit, dtype=torch.long, device=param.device)  # [N, limit]
        stopped_at = torch.full((n,), limit, dtype=torch.long, device=param.device)  # [N]
        for step in range(limit):
            tokens = next_tokens(logits[:, : cfg.vocab_size].float(), temperature=settings.temperature,
                                 top_k=settings.top_k, top_p=settings.top_p, generator=generator)  # [N]
            out[:, step] = tokens
            if settings.stop_token is not None:
                first_stop = (tokens == settings.stop_token) & (stopped_at == limit)  # [N]
                stopped_at = torch.where(first_stop, step, stopped_at)
                if bool((stopped_at < limit).all()):
                    break
            if step + 1 < limit:
                # Stopped sequences keep stepping with the batch; their later tokens are discarded below.
                logits = model.forward_cached(tokens[:, None], cache, len(prompt) + step, last_only=True)[:, -1]
    finally:
        model.train(was_training)
    sequences, reasons = [], []
    for row, stop in zip(out.tolist(), stopped_at.tolist()):
        sequences.append(row[:stop])
        if stop < limit:
            reasons.append("stop")
        else:
            reasons.append("length" if limit == settings.max_new_tokens else "context")
    return Generation(prompt_tokens=len(prompt), sequences=sequences, finish_reasons=reasons)


@torch.no_grad()
def sample(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` ids, recomputing the last context_length tokens
    each step (no KV cache). ``forward`` replaces ``model(tokens)`` (e.g. to gather logits a parallel
    layout leaves sharded)."""
    if not prompt:
        raise ValueError("sample: the prompt must hold at least one token")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    cfg = model.config
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    try:
        for _ in range(max_new_tokens):
            window = ids[:, -cfg.context_length :]
            logits = (forward or model)(window)[:, -1, : cfg.vocab_size].float()  # [1, V] real vocabulary only
            next_id = next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            if stop_token is not None and int(next_id) == stop_token:
                break
    finally:
        model.train(was_training)
    return ids[0, len(prompt) :].tolist()
