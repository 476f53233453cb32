"""The one model config of the GPT family. Presets (``presets.py``) are rows of values for it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..common.errors import UserError


def pad_vocab(vocab_size: int, multiple: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` (matmul-friendly embedding rows)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


class ModelConfigError(UserError):
    """Every problem of a model config; ``errors`` holds one message per field."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid model config: " + "; ".join(errors))


@dataclass(kw_only=True)
class GPTConfig:
    """Shape and behaviour of a decoder-only GPT (GPT-1, GPT-2 or GPT-3 style)."""

    n_layer: int
    """Number of transformer blocks."""
    d_model: int
    """Hidden size."""
    n_head: int
    """Attention heads; ``d_model`` must divide evenly into them."""
    d_ffn: int | None = None
    """MLP inner size; ``None`` means 4 x d_model (GPT-1 3072 at 768; GPT-3 "FFN = 4 x d_model")."""
    context_length: int = 1024
    """Maximum sequence length (learned position embeddings have this many rows)."""
    vocab_size: int = 50257
    """Real vocabulary size of the tokenizer; token ids are always below it."""
    pad_vocab_multiple: int = 128
    """Embedding rows are padded up to a multiple of this; padded rows are never sampled."""
    norm_position: Literal["pre", "post"] = "pre"
    """``post``: LayerNorm after each residual add (GPT-1); ``pre``: at each sub-block input (GPT-2/3)."""
    final_norm: bool = True
    """A LayerNorm after the last block (GPT-2 and later)."""
    dropout: float = 0.0
    """Dropout on embeddings, residual branches and attention probabilities (GPT-1/2 used 0.1)."""
    bias: bool = True
    """Biases in linear layers and LayerNorms, as in GPT-1/2/3."""
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    """Weights are initialised N(0, init_std) (GPT-1 section 4.1)."""
    scale_residual_init: bool = True
    """Scale the init of residual output projections by 1/sqrt(2 n_layer) (GPT-2 section 2.3)."""
    attention_pattern: Literal["dense", "alternating"] = "dense"
    """``alternating``: odd layers use a locally banded causal mask (GPT-3 section 2.1, after the
    Sparse Transformer); even layers stay dense."""
    local_window: int = 256
    """Width of the band for the sparse layers: a token sees itself and the previous window-1 tokens."""

    def __post_init__(self) -> None:
        errors = self.validate()
        if errors:
            raise ModelConfigError(errors)

    def validate(self) -> list[str]:
        """Every problem with the values, each naming its field (empty when valid)."""
        errors = []
        for name in ("n_layer", "d_model", "n_head", "context_length", "vocab_size", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                errors.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head >= 1 and self.d_model % self.n_head:
            errors.append(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.d_ffn is not None and self.d_ffn < 1:
            errors.append(f"model.d_ffn must be >= 1, got {self.d_ffn}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_position not in ("pre", "post"):
            errors.append(f"model.norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.attention_pattern not in ("dense", "alternating"):
            errors.append(
                f"model.attention_pattern must be 'dense' or 'alternating', got {self.attention_pattern!r}"
            )
        if self.local_window < 1:
            errors.append(f"model.local_window must be >= 1, got {self.local_window}")
        return errors

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn if self.d_ffn is not None else 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size, self.pad_vocab_multiple)

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether block ``layer`` uses the locally banded mask (odd layers under ``alternating``)."""
        return self.attention_pattern == "alternating" and layer % 2 == 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shape_dict(self) -> dict:
        """The fields that decide the shapes of the weights (what a checkpoint must agree on)."""
        return {
            "n_layer": self.n_layer,
            "d_model": self.d_model,
            "n_head": self.n_head,
            "ffn_dim": self.ffn_dim,
            "context_length": self.context_length,
            "padded_vocab_size": self.padded_vocab_size,
            "bias": self.bias,
        }
