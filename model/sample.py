"""Autoregressive sampling for a quick look at a model (no KV cache: recomputes the window each step)."""

from __future__ import annotations

from typing import Callable

import torch

from gptforge.model.gpt import GPT


@torch.no_grad()
def sample(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` ids. Padding columns of the vocabulary
    (ids >= config.vocab_size) are cut off before sampling, so they can never be produced. ``forward``
    replaces ``model(tokens)`` (e.g. to gather logits a parallel layout leaves sharded)."""
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
            logits = (forward or model)(window)[0, -1, : cfg.vocab_size].float()  # [V] real vocabulary only
            if temperature == 0:
                next_id = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
            if stop_token is not None and next_id == stop_token:
                break
    finally:
        model.train(was_training)
    return ids[0, len(prompt) :].tolist()
