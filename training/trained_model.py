"""A trained model from a checkpoint of any parallel layout, consolidated into one process (generation,
export, evaluation, fine-tuning start from here).

A checkpoint holds the weights by parameter name (torch.distributed.checkpoint), the model config and
the tokenizer (``trainer_state.json``, ``tokenizer.model`` or ``tokenizer.json``): nothing else is
needed to rebuild it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from ..common.errors import UserError
from .checkpoint import STATE_FILE, TOKENIZER_FILES, find_tokenizer, is_complete
from ..model.config import GPTConfig
from ..model.gpt import GPT


@dataclass(kw_only=True)
class TrainedModel:
    model: GPT
    config: GPTConfig
    tokenizer_path: str
    checkpoint: str
    """The step folder it came from."""
    state: dict
    """Its trainer_state.json (step, tokens seen, the training config)."""


def parse_device(name: str) -> torch.device:
    """The ``--device`` of the commands that load a trained model (generate, eval, finetune)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_checkpoint(path: str) -> str:
    """A step folder, a ``checkpoints`` folder or a run folder -> the newest complete step folder."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint: no such file or folder {path!r}")
    if is_complete(path):
        return path
    for folder in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(folder):
            steps = sorted(n for n in os.listdir(folder) if n.startswith("step_") and is_complete(os.path.join(folder, n)))
            if steps:
                return os.path.join(folder, steps[-1])
    raise UserError(f"checkpoint: {path!r} holds no complete gptforge checkpoint (a step_NNNNNNNN folder with "
                     f"{STATE_FILE} and .metadata, or a run folder with checkpoints/)")


def load_trained_model(path: str, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model of a checkpoint (any layout it was trained under) with its weights, in eval mode."""
    import torch.distributed.checkpoint as dcp

    step_dir = resolve_checkpoint(path)
    with open(os.path.join(step_dir, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    if "model_config" not in state:
        raise UserError(f"checkpoint {step_dir!r} has no model config (written by an older gptforge); "
                         f"resume training once to write a new checkpoint")
    config = GPTConfig(**state["model_config"])
    tokenizer_path = find_tokenizer(step_dir)
    if tokenizer_path is None:
        raise UserError(f"checkpoint {step_dir!r} has no tokenizer ({' or '.join(TOKENIZER_FILES.values())})")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    weights = model.state_dict()  # every tensor is filled from the checkpoint below
    with warnings.catch_warnings():  # "loading in a single process" is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": weights}, checkpoint_id=step_dir, no_dist=True)
    model.load_state_dict(weights)
    model.eval()
    return TrainedModel(model=model, config=config, tokenizer_path=tokenizer_path, checkpoint=step_dir, state=state)
