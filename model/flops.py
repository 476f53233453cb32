"""Parameter counts, FLOPs per token, MFU and single-replica memory, all without allocating weights."""

from __future__ import annotations

import torch

from .config import GPTConfig
from .gpt import GPT


def count_parameters(config: GPTConfig) -> dict[str, int]:
    """Counts from a model built on the meta device (no memory). ``total`` counts tied weights once."""
    with torch.device("meta"):
        model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    position = model.pos_embeddings.weight.numel()
    token = model.tok_embeddings.weight.numel()
    return {
        "total": total,
        "token_embedding": token,
        "position_embedding": position,
        "non_embedding": total - token - position,
        # The table-comparable count: the embedding rows the real vocabulary uses, no padding.
        "unpadded": total - (config.padded_vocab_size - config.vocab_size) * config.d_model,
    }


MFU_CONVENTIONS = {
    "6n": "6N",
    "6n_attn": "6N + 12*L*d*T",
}
"""The two ways MFU is counted, by key (``mfu_<key>`` in metrics): ``6n`` is Kaplan et al.'s 6 FLOPs per
parameter per token (forward 2N, backward 4N; what llm-foundry and nanoGPT's ``6N`` figures use);
``6n_attn`` adds the attention score and value matmuls, 12·L·d·T (PaLM appendix B; Megatron-LM's
model FLOPs count them too). N excludes position embeddings; T is the sequence length."""


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int | None = None,
                    convention: str = "6n_attn") -> float:
    """Training FLOPs per token, forward + backward, in one of ``MFU_CONVENTIONS``: 6 N, or 6 N + 12 L d T
    (PaLM appendix B, as in nanoGPT).

    N counts every parameter except position embeddings: the tied token embedding is counted once,
    for the output projection matmul (an embedding lookup itself costs no FLOPs). The attention term
    counts the full T x T score matrix (no halving for the causal mask)."""
    if convention not in MFU_CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(MFU_CONVENTIONS)}, got {convention!r}")
    if n_params is None:
        counts = count_parameters(config)
        n_params = counts["total"] - counts["position_embedding"]
    attention = 12.0 * config.n_layer * config.d_model * seq_len if convention == "6n_attn" else 0.0
    return 6.0 * n_params + attention


def replica_memory_bytes(config: GPTConfig, *, micro_batch: int, seq_len: int, precision: str) -> dict[str, int]:
    """Memory of one unsharded replica under AdamW.

    Weights and grads in the compute dtype; with bf16/fp16 an fp32 master copy as well; two fp32 Adam
    moments. Activations per layer follow Korthikanti et al. 2022 (no recompute, flash attention so
    no T x T term): 34 s b h bytes in 16-bit, doubled for fp32; plus fp32 logits [b, s, V]."""
    n = count_parameters(config)["total"]
    width = 4 if precision == "fp32" else 2
    weights = n * width
    grads = n * width
    master = 0 if precision == "fp32" else n * 4
    optimizer = n * 8
    act_per_layer = 34 * seq_len * micro_batch * config.d_model * (2 if precision == "fp32" else 1)
    logits = micro_batch * seq_len * config.padded_vocab_size * 4 * 2  # logits + their grad, fp32
    activations = config.n_layer * act_per_layer + logits
    return {
        "weights": weights,
        "gradients": grads,
        "master_weights": master,
        "optimizer_state": optimizer,
        "activations": activations,
        "total": weights + grads + master + optimizer + activations,
    }
