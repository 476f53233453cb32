"""gptforge.model: the GPT-1/2/3 family in plain PyTorch (no torch.distributed)."""

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT, build_model, lm_loss_sum
from gptforge.model.presets import PRESETS, Preset, get_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "Preset", "build_model", "get_preset", "lm_loss_sum"]
