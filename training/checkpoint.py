"""Sharded, atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<dir>/step_00000100/``: DCP shards + ``.metadata`` (model and optimizer, by fully
qualified name, so another parallel layout can reshard them), ``trainer_state.json`` (step, tokens,
data position, schedule, MLflow run id, the model config), the tokenizer (``tokenizer.model`` for
SentencePiece, ``tokenizer.json`` for byte-level BPE) and ``rng_rank{r}.pt`` (each rank's RNG states).

A checkpoint whose ``trainer_state.json`` says ``"weights_only": true`` (written by ``gptforge
import-hf``) starts training from its weights with a fresh optimizer and the run's own RNG seed.

Every checkpoint folder (training's, ``gptforge finetune``'s, ``gptforge import-hf``'s) is written by
``write_checkpoint``: under ``.tmp-step_...``, renamed into place only after every rank finished and the
files were fsynced, so a torn save is never picked up; ``keep_last`` complete ones are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..common.atomic import atomic_folder, atomic_write_json, sibling, swap_folder
from ..common.errors import UserError
from ..parallel import deepspeed_engine
from ..model.gpt import GPT
from ..parallel.distributed import DistInfo, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
# The checkpoint's copy of the tokenizer is named for its kind, so the file says what it holds;
# ``Tokenizer`` reads the kind from the content, so a copy under the other name still loads.
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "byte-bpe": "tokenizer.json"}
# Optimizer state and hyperparameters keyed per parameter name ("state.<fqn>.exp_avg",
# "param_groups.<fqn>.lr"): ranks of different pipeline stages hold different parameter groups, and a
# list of groups saved under one key would keep only one rank's copy.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointMismatchError(UserError):
    pass


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, ".metadata"))


def tokenizer_file_name(tokenizer_path: str) -> str:
    """The name a checkpoint gives its copy of the tokenizer at ``tokenizer_path``."""
    from ..data_prep.tokenization.tokenizer import tokenizer_kind

    return TOKENIZER_FILES[tokenizer_kind(tokenizer_path)]


def find_tokenizer(step_dir: str) -> str | None:
    """The tokenizer file of the checkpoint folder ``step_dir`` (either kind), or None."""
    for name in TOKENIZER_FILES.values():
        path = os.path.join(step_dir, name)
        if os.path.isfile(path):
            return path
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: str, state_dicts: dict[str, dict], trainer_state: dict, *,
                     files: Mapping[str, str] | None = None, extra: Mapping[str, object] | None = None,
                     info: DistInfo | None = None, before_commit: Callable[[str], None] | None = None) -> str:
    """Write the checkpoint folder ``directory``: ``state_dicts`` with DCP (``{"model": ...}``, optionally
    ``"optim"``, by parameter name), ``trainer_state`` as ``trainer_state.json``, ``files`` (name -> path)
    copied in, ``extra`` (name -> object; ``.json`` names as JSON, others with ``torch.save``). It is
    written beside ``directory`` under ``.tmp-NAME``, fsynced and renamed into place (an older folder of
    that name is replaced only then), so a reader never sees a partial one.

    ``info`` None: this one process writes it all. Otherwise every rank of the job calls it: each saves
    its shards and its RNG state (``rng_rank{r}.pt``, for an exact resume); ``before_commit(tmp_dir)``
    runs on every rank once all shards are written; rank 0 completes the folder and renames it. A save
    killed before the rename leaves only ``.tmp-NAME`` (``CheckpointManager`` removes it)."""
    if info is None:
        with atomic_folder(directory) as tmp:
            with warnings.catch_warnings():  # one process is the point here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state_dicts, checkpoint_id=tmp, no_dist=True)
            if before_commit is not None:
                before_commit(tmp)
            _write_small_files(tmp, trainer_state, files, extra)
        return directory
    tmp = sibling(directory, "tmp")
    dcp.save(state_dicts, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{info.rank}.pt"))
    barrier()
    if before_commit is not None:
        before_commit(tmp)
    if info.is_main:
        _write_small_files(tmp, trainer_state, files, extra)
        swap_folder(tmp, directory)
    barrier()
    return directory


def _write_small_files(folder: str, trainer_state: dict, files: Mapping[str, str] | None,
                       extra: Mapping[str, object] | None) -> None:
    for name, source in (files or {}).items():
        shutil.copyfile(source, os.path.join(folder, name))
    for name, obj in (extra or {}).items():
        if name.endswith(".json"):
            atomic_write_json(os.path.join(folder, name), obj)
        else:
            torch.save(obj, os.path.join(folder, name))
    # Last: with .metadata it is what makes a folder a complete checkpoint (``is_complete``).
    atomic_write_json(os.path.join(folder, STATE_FILE), trainer_state)


def write_model_checkpoint(directory: str, model: GPT, tokenizer_path: str, state: dict, *,
                           optim_state: dict | None = None, extra: Mapping[str, object] | None = None) -> str:
    """A plain (unsharded) GPT of this one process as a checkpoint folder that ``load_trained_model`` reads
    and training resumes from: its weights, ``state`` plus the model's config and shape in
    ``trainer_state.json``, a copy of the tokenizer, and ``optim_state`` (optimizer state by parameter
    name) when given; ``extra`` as in ``write_checkpoint``."""
    state_dicts = {"model": model.state_dict()} | ({"optim": optim_state} if optim_state is not None else {})
    trainer_state = state | {"model_config": dataclasses.asdict(model.config),
                             "model_shape": model.config.shape_dict()}
    return write_checkpoint(directory, state_dicts, trainer_state,
                            files={tokenizer_file_name(tokenizer_path): tokenizer_path}, extra=extra)


class CheckpointManager:
    def __init__(self, directory: str, keep_last: int, info: DistInfo) -> None:
        self.dir = directory
        self.keep_last = keep_last
        self.info = info
        if info.is_main:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                if name.startswith((".tmp-", ".old-")):  # left by a save that was killed
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        barrier()

    def complete_steps(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            match = _STEP_DIR.match(name)
            path = os.path.join(self.dir, name)
            if match and is_complete(path):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> str | None:
        steps = self.complete_steps()
        return steps[-1][1] if steps else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             engine=None, files: dict[str, str] | None = None,
             before_commit: Callable[[str], None] | None = None) -> str:
        """``files``: name -> path of small files copied in (the tokenizer), so a checkpoint is usable
        on its own (generation, export). ``before_commit(tmp_dir)`` runs on every rank once every rank's
        shards are written, before the checkpoint is made complete (callbacks' ``on_checkpoint_written``)."""
        final = os.path.join(self.dir, f"step_{step:08d}")
        if is_complete(final):
            return final
        if engine is not None:  # DeepSpeed: gathered to named full tensors, the same files as any layout
            model_sd, optim_sd = deepspeed_engine.full_state_dicts(engine, model, step)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
        write_checkpoint(final, {"model": model_sd, "optim": optim_sd}, trainer_state | {"step": step},
                         files=files, info=self.info, before_commit=before_commit)
        if self.info.is_main:
            for _, old in self.complete_steps()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, model_shape: dict,
             engine=None) -> dict:
        """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state."""
        if not is_complete(path):
            raise CheckpointMismatchError(f"checkpoint {path!r} is not a complete gptforge checkpoint "
                                          f"(no {STATE_FILE} or .metadata)")
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
            state = json.load(handle)
        saved_shape = state.get("model_shape", {})
        diffs = [f"{k}: checkpoint {saved_shape.get(k)!r} vs config {v!r}" for k, v in model_shape.items()
                 if saved_shape.get(k) != v]
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {path!r} holds a model of another shape ({'; '.join(diffs)}); resume with the "
                f"config it was trained with, or start a new run.dir / --resume none"
            )
        weights_only = bool(state.get("weights_only"))
        if engine is not None:  # an imported checkpoint holds zero Adam moments at step 0 for this reader
            deepspeed_engine.load_full_state_dicts(engine, model, path)
        elif weights_only:
            # The optimizer keeps its fresh state and the hyperparameters of this run's config.
            model_sd, _ = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
            target = {"model": model_sd}
            dcp.load(target, checkpoint_id=path)
            set_model_state_dict(model, target["model"], options=STATE_DICT_OPTIONS)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
            target = {"model": model_sd, "optim": optim_sd}
            dcp.load(target, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                           options=STATE_DICT_OPTIONS)
        rng_path = os.path.join(path, f"rng_rank{self.info.rank}.pt")
        if os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=False))
        elif not weights_only:
            # Resumed on more ranks than saved it: weights and data position are exact, dropout is not.
            warnings.warn(f"{rng_path} not found (checkpoint written by {state.get('world_size')} ranks); "
                          f"rank {self.info.rank} keeps its freshly seeded RNG")
        return state
