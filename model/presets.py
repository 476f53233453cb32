"""Named model presets, in one table, each row citing the paper row it comes from.

GPT-3 rows carry the Table 2.1 batch size (tokens) and learning rate as well, so a training config
can start from the paper's recipe. ``paper_params`` is the size the paper reports for the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.errors import UserError
from .config import GPTConfig


@dataclass(kw_only=True, frozen=True)
class Preset:
    """A model shape plus the paper's training numbers for it."""

    name: str
    source: str
    """Where the numbers come from (paper, table, row)."""
    model: dict = field(default_factory=dict)
    """Keyword arguments of ``GPTConfig``."""
    paper_params: float | None = None
    """Parameter count reported by the paper (None for debug presets)."""
    batch_tokens: int | None = None
    """Global batch size in tokens (GPT-3 Table 2.1)."""
    lr: float | None = None
    """Peak learning rate (GPT-3 Table 2.1)."""
    note: str = ""

    def config(self, **overrides) -> GPTConfig:
        return GPTConfig(**(self.model | overrides))


_GPT2 = dict(norm_position="pre", final_norm=True, context_length=1024, vocab_size=50257, dropout=0.1)
_GPT3 = dict(norm_position="pre", final_norm=True, context_length=2048, vocab_size=50257, dropout=0.0)
_T21 = "GPT-3 (Brown et al. 2020) Table 2.1"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="gpt1",
            source="GPT-1 (Radford et al. 2018) section 4.1: 12 layers, 768 hidden, 12 heads, FFN 3072, 512 ctx",
            model=dict(
                n_layer=12, d_model=768, n_head=12, d_ffn=3072, context_length=512,
                vocab_size=40478, norm_position="post", final_norm=False, dropout=0.1,
                scale_residual_init=False,
            ),
            paper_params=117e6,
            note="40,000 BPE merges + 478 base symbols = 40,478 tokens (the released GPT-1 vocabulary)",
        ),
        Preset(name="gpt2-124m", source="GPT-2 (Radford et al. 2019) Table 2, 117M row (124M with embeddings)",
               model=dict(n_layer=12, d_model=768, n_head=12, **_GPT2), paper_params=124e6),
        Preset(name="gpt2-355m", source="GPT-2 Table 2, 345M row", model=dict(n_layer=24, d_model=1024, n_head=16, **_GPT2),
               paper_params=355e6),
        Preset(name="gpt2-774m", source="GPT-2 Table 2, 762M row", model=dict(n_layer=36, d_model=1280, n_head=20, **_GPT2),
               paper_params=774e6),
        Preset(name="gpt2-1558m", source="GPT-2 Table 2, 1542M row", model=dict(n_layer=48, d_model=1600, n_head=25, **_GPT2),
               paper_params=1558e6),
        Preset(name="gpt3-125m", source=f"{_T21}, Small", model=dict(n_layer=12, d_model=768, n_head=12, **_GPT3),
               paper_params=125e6, batch_tokens=524_288, lr=6.0e-4),
        Preset(name="gpt3-350m", source=f"{_T21}, Medium", model=dict(n_layer=24, d_model=1024, n_head=16, **_GPT3),
               paper_params=350e6, batch_tokens=524_288, lr=3.0e-4),
        Preset(name="gpt3-760m", source=f"{_T21}, Large", model=dict(n_layer=24, d_model=1536, n_head=16, **_GPT3),
               paper_params=760e6, batch_tokens=524_288, lr=2.5e-4),
        Preset(name="gpt3-1.3b", source=f"{_T21}, XL", model=dict(n_layer=24, d_model=2048, n_head=16, **_GPT3),
               paper_params=1.3e9, batch_tokens=1_048_576, lr=2.0e-4,
               note="Table 2.1 prints 24 heads x 128 = 3072 != d_model 2048. We keep d_model 2048 and d_head 128, "
                    "so 16 heads; heads do not change the parameter count (1.316B)."),
        Preset(name="gpt3-2.7b", source=f"{_T21}, 2.7B", model=dict(n_layer=32, d_model=2560, n_head=32, **_GPT3),
               paper_params=2.7e9, batch_tokens=1_048_576, lr=1.6e-4),
        Preset(name="gpt3-6.7b", source=f"{_T21}, 6.7B", model=dict(n_layer=32, d_model=4096, n_head=32, **_GPT3),
               paper_params=6.7e9, batch_tokens=2_097_152, lr=1.2e-4),
        Preset(name="gpt3-13b", source=f"{_T21}, 13B", model=dict(n_layer=40, d_model=5120, n_head=40, **_GPT3),
               paper_params=13.0e9, batch_tokens=2_097_152, lr=1.0e-4,
               note="Table 2.1 prints d_model 5140 but 40 heads x 128 = 5120. We use 5120 (divisible by heads "
                    "and by 128 for tensor cores); 12.85B parameters, 1.2% under the printed 13.0B."),
        Preset(name="gpt3-175b", source=f"{_T21}, 175B", model=dict(n_layer=96, d_model=12288, n_head=96, **_GPT3),
               paper_params=175.0e9, batch_tokens=3_200_000, lr=0.6e-4,
               note="3.2M tokens is 1562.5 sequences of 2048; training configs round to 1536 sequences."),
        # Debug presets: small enough for CPU tests and the quickstart.
        Preset(name="tiny", source="debug preset (pre-LN, GPT-2 style)",
               model=dict(n_layer=2, d_model=64, n_head=4, context_length=128, vocab_size=512, dropout=0.0)),
        Preset(name="tiny-post-ln", source="debug preset (post-LN, GPT-1 style)",
               model=dict(n_layer=2, d_model=64, n_head=4, context_length=128, vocab_size=512,
                          norm_position="post", final_norm=False, scale_residual_init=False)),
        Preset(name="tiny-sparse", source="debug preset (GPT-3 alternating dense / banded attention)",
               model=dict(n_layer=4, d_model=64, n_head=4, context_length=128, vocab_size=512,
                          attention_pattern="alternating", local_window=16)),
        Preset(name="quickstart", source="debug preset sized for a few minutes of CPU training",
               model=dict(n_layer=4, d_model=192, n_head=6, context_length=256, vocab_size=4096, dropout=0.0)),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a ValueError listing the ones that exist."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def gpt3_presets() -> list[Preset]:
    return [p for p in PRESETS.values() if p.name.startswith("gpt3-")]

