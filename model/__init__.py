"""gptforge.model: the GPT-1/2/3 family in plain PyTorch (no torch.distributed)."""

from .config import GPTConfig
from .gpt import GPT, build_model, lm_loss_sum
from .presets import PRESETS, Preset, get_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "Preset", "build_model", "get_preset", "lm_loss_sum"]
