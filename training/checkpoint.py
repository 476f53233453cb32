"""Sharded, atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<dir>/step_00000100/``: DCP shards + ``.metadata`` (model and optimizer, by fully
qualified name, so another parallel layout can reshard them), ``trainer_state.json`` (step, tokens,
data position, schedule, MLflow run id, the model config), the tokenizer (``tokenizer.model`` for
SentencePiece, ``tokenizer.json`` for byte-level BPE) and ``rng_rank{r}.pt`` (each rank's RNG states).

A checkpoint whose ``trainer_state.json`` says ``"weights_only": true`` (written by ``gptforge
import-hf``) starts training from its weights with a fresh optimizer and the run's own RNG seed.

Every checkpoint folder (training's, ``gptforge finetune``'s, ``gptforge import-hf``'s) is written
under ``.tmp-step_...`` and renamed into place only after every rank finished and the files were fsynced,
so a torn save is never picked up; ``keep_last`` complete ones are kept.

Training writes in the background (``checkpoint.async_save``): each rank copies its own shards to host
memory (the only part the step waits for) and a thread writes them while training goes on; the
checkpoint is made complete (``CheckpointWrite.commit``: every rank's shards on disk, then rank 0 writes
``trainer_state.json`` and renames the folder) in the training loop, on every rank together, as soon as
all ranks' writes are done, and at the latest before the next save, the end of the run or a stop on a
signal. A process that dies before that leaves only ``.tmp-step_...``: the previous checkpoint stays
the newest complete one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..common.atomic import atomic_folder, atomic_write_json, sibling, swap_folder
from ..common.errors import UserError
from ..parallel import deepspeed_engine
from ..model.gpt import GPT
from ..parallel.distributed import DistInfo, LaggedSum, barrier

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


def checkpoint_step(path: str) -> int:
    """The step a checkpoint folder is named for: ``step_00000100`` or its ``.tmp-step_00000100``."""
    name = os.path.basename(os.path.normpath(path))
    match = _STEP_DIR.match(name.removeprefix(".tmp-"))
    if match is None:
        raise ValueError(f"{path!r} is not a checkpoint folder name (step_NNNNNNNN)")
    return int(match.group(1))


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
    """This process's generators, and the model-parallel one for dropout on tensor-parallel shards
    (parallel/rng.py), which differs per tensor-parallel rank: saved per rank (``rng_rank{r}.pt``)."""
    from ..parallel.rng import model_parallel_rng

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if (tracker := model_parallel_rng()) is not None:
        state["model_parallel"] = tracker.state_dict()
    return state


def set_rng_state(state: dict) -> None:
    from ..parallel.rng import model_parallel_rng

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = model_parallel_rng()
    if tracker is None:
        return
    if "model_parallel" not in state:
        warnings.warn("the checkpoint holds no tensor-parallel dropout generator (written without tensor "
                      "parallelism or dropout): this rank keeps its freshly seeded one")
        return
    try:
        tracker.load_state_dict(state["model_parallel"])
    except ValueError as err:
        warnings.warn(f"tensor-parallel dropout generator not restored ({err}): this rank keeps its freshly "
                      f"seeded one")


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
    begin_checkpoint(directory, state_dicts, trainer_state, info=info, files=files, extra=extra,
                     before_commit=before_commit).commit()
    return directory


@dataclass(kw_only=True, frozen=True)
class SaveTimes:
    """How long one checkpoint took: seconds since its save began, by this rank's clock
    (``written_s``: the slowest rank's)."""

    path: str
    staged_s: float
    """Until this rank's shards were copied to host memory and training could go on (a synchronous
    save: until they were on disk)."""
    written_s: float
    """Until the last rank's shards (and rank 0's ``.metadata``) were on disk."""
    committed_s: float
    """Until the folder was complete and in place."""
    blocked_s: float
    """What the training loop spent on it: staging, waiting for the write at the commit, the commit."""
    background: bool
    """Written by a thread while training went on (``checkpoint.async_save``)."""


class _Stager(DefaultStager):
    """``DefaultStager`` for DTensors and plain tensors (their storages copied to host memory, which it
    keeps for the next save), and host copies of the local shards for ShardedTensor values (DeepSpeed's
    partitions), which it cannot copy itself."""

    def stage(self, state_dict, **kwargs):
        sharded: dict[tuple, ShardedTensor] = {}

        def without_sharded(tree, path: tuple):
            if isinstance(tree, ShardedTensor):
                sharded[path] = tree
                return None
            if isinstance(tree, dict):
                return {key: without_sharded(value, path + (key,)) for key, value in tree.items()}
            return tree

        staged = super().stage(without_sharded(state_dict, ()), **kwargs)
        for path, tensor in sharded.items():
            parent = staged
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = _host_copy(tensor)
        return staged


def _host_copy(tensor: ShardedTensor) -> ShardedTensor:
    """The same ShardedTensor with this rank's shards copied to (unpinned) host memory and placed there."""
    cpu = torch.device("cpu")
    metadata = copy.deepcopy(tensor.metadata())
    metadata.tensor_properties.pin_memory = False
    for shard_metadata in metadata.shards_metadata:
        shard_metadata.placement._device = cpu  # as ShardedTensor.cpu() relabels them
    shards = []
    for shard in tensor.local_shards():
        shard_metadata = copy.deepcopy(shard.metadata)
        shard_metadata.placement._device = cpu
        local = shard.tensor.detach().to(cpu, copy=True).requires_grad_(metadata.tensor_properties.requires_grad)
        shards.append(Shard(tensor=local, metadata=shard_metadata))
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata,
                                                                     process_group=tensor._process_group)


class BackgroundWriter:
    """What the background saves of one process share. DCP runs its collectives (the save plan, the
    final gather for ``.metadata``) in the writer thread: they get their own gloo group of every rank,
    because the ranks must issue a group's collectives in the same order and the training loop's run
    on the default group at the same time, and because DCP needs a CPU-capable group where the default
    one is NCCL. The stager keeps its host copies for the next save (pinned on CUDA, so device-to-host
    copies run at full speed); a save reuses them only after the previous one was committed."""

    def __init__(self, device: torch.device) -> None:
        self.group = dist.new_group(backend="gloo")  # collective: every rank creates it at the same save
        self.stager = _Stager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                             use_async_staging=False, use_non_blocking_copy=False))

    def close(self) -> None:
        self.stager.close()


class CheckpointWrite:
    """A checkpoint folder whose shards are being written (``begin_checkpoint``) and that ``commit``
    completes. Everything that describes the step (``trainer_state``, this rank's RNG state) is
    captured when the save begins, so a commit some steps later writes the saved step's values."""

    def __init__(self, *, directory: str, trainer_state: dict, info: DistInfo, files: Mapping[str, str] | None,
                 extra: Mapping[str, object] | None, before_commit: Callable[[str], None] | None,
                 rng: dict, future: Future | None, started: float) -> None:
        self.directory, self.tmp = directory, sibling(directory, "tmp")
        self.trainer_state, self.info = trainer_state, info
        self.files, self.extra, self.before_commit = files, extra, before_commit
        self.rng = rng
        self.future, self.started = future, started
        self.staged_s = time.perf_counter() - started
        self._written_at: float | None = None if future is not None else time.perf_counter()
        if future is not None:
            future.add_done_callback(self._on_written)

    def _on_written(self, _future: Future) -> None:  # in the writer thread, as it finishes
        self._written_at = time.perf_counter()

    @property
    def background(self) -> bool:
        return self.future is not None

    def written_here(self) -> bool:
        """This rank's shards are on disk (or their write failed); no collective."""
        return self.future is None or self.future.done()

    def commit(self) -> SaveTimes:
        """Collective, on every rank: wait for this rank's write, then (all written) ``before_commit``,
        rank 0 writes the small files and renames the folder into place. A failed write on any rank
        raises on every rank and leaves the folder incomplete."""
        error: BaseException | None = None
        waited_from = time.perf_counter()
        if self.future is not None:
            try:
                self.future.result()
            except Exception as err:  # raised below, after the other ranks learned of it
                error = err
        done = time.perf_counter()
        if error is None:
            torch.save(self.rng, os.path.join(self.tmp, f"rng_rank{self.info.rank}.pt"))
        # A done callback runs just after ``result()`` returns: a missing time is "now".
        written_s = (self._written_at or done) - self.started
        failed, written_s = _max_over_ranks([float(error is not None), written_s], self.info.device)
        if failed:  # every rank raises: none waits in a collective for a rank that gave up
            raise error if error is not None else RuntimeError(
                f"checkpoint {self.directory}: another rank failed to write its shards")
        if self.before_commit is not None:
            self.before_commit(self.tmp)
        if self.info.is_main:
            _write_small_files(self.tmp, self.trainer_state, self.files, self.extra)
            swap_folder(self.tmp, self.directory)
        barrier()
        committed = time.perf_counter()
        return SaveTimes(path=self.directory, staged_s=self.staged_s, written_s=written_s,
                         committed_s=committed - self.started,
                         blocked_s=self.staged_s + (committed - waited_from) if self.background
                         else committed - self.started, background=self.background)


def begin_checkpoint(directory: str, state_dicts: dict[str, dict], trainer_state: dict, *, info: DistInfo,
                     files: Mapping[str, str] | None = None, extra: Mapping[str, object] | None = None,
                     before_commit: Callable[[str], None] | None = None,
                     background: BackgroundWriter | None = None, started: float | None = None) -> CheckpointWrite:
    """Every rank: start writing the checkpoint folder ``directory`` (arguments as in
    ``write_checkpoint``) under ``.tmp-NAME``; ``commit()`` the result to complete it. ``background``
    None: the shards are on disk when this returns. Otherwise this rank's shards (its own: DTensor and
    ShardedTensor values stage their local shards only) are copied to host memory and a thread writes
    them. ``started``: when the save began (``time.perf_counter()``), for ``SaveTimes``."""
    started = time.perf_counter() if started is None else started
    tmp = sibling(directory, "tmp")
    rng = rng_state()
    future = None
    if background is None:
        dcp.save(state_dicts, checkpoint_id=tmp)
    else:
        future = dcp.async_save(state_dicts, checkpoint_id=tmp, process_group=background.group,
                                async_stager=background.stager)
    return CheckpointWrite(directory=directory, trainer_state=trainer_state, info=info, files=files, extra=extra,
                           before_commit=before_commit, rng=rng, future=future, started=started)


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


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
    """The checkpoints of one run directory, on every rank: saves (in the background when
    ``async_save``; at most one pending), the newest complete one, pruning to ``keep_last``."""

    def __init__(self, directory: str, keep_last: int, info: DistInfo, *, async_save: bool = False) -> None:
        self.dir = directory
        self.keep_last = keep_last
        self.info = info
        self.async_save = async_save
        """Write in the background (``checkpoint.async_save``); False: ``save`` returns once complete."""
        self.saves: list[SaveTimes] = []
        """The checkpoints this process committed, oldest first."""
        self.pending: CheckpointWrite | None = None
        """The background save not yet committed."""
        self._writer: BackgroundWriter | None = None
        # Whether every rank finished writing a background save, asked without holding up the step.
        # Collective: every rank builds its manager at the same point.
        self._written_vote = LaggedSum() if async_save else None
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
        """Save ``step`` (collective). ``files``: name -> path of small files copied in (the tokenizer), so
        a checkpoint is usable on its own (generation, export). ``before_commit(tmp_dir)`` runs on every
        rank once every rank's shards are written, before the checkpoint is made complete (callbacks'
        ``on_checkpoint_written``). With ``async_save`` the previous background save is committed
        first and this one returns once staged: ``poll``/``wait`` complete it."""
        final = os.path.join(self.dir, f"step_{step:08d}")
        self.wait()
        if is_complete(final):
            return final
        started = time.perf_counter()
        if engine is not None:  # DeepSpeed: by parameter name, the same files as any layout
            model_sd, optim_sd = deepspeed_engine.full_state_dicts(engine, model, step)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
        if self.async_save and self._writer is None:
            self._writer = BackgroundWriter(self.info.device)
        write = begin_checkpoint(final, {"model": model_sd, "optim": optim_sd}, trainer_state | {"step": step},
                                 info=self.info, files=files, before_commit=before_commit,
                                 background=self._writer if self.async_save else None, started=started)
        if write.background:
            self.pending = write
        else:
            self._commit(write)
        return final

    def poll(self) -> SaveTimes | None:
        """Collective while a save is pending: commit it if every rank's write was done at the previous
        poll (else return None at once; the question is a ``LaggedSum``, so no step waits for it). Called
        after each step: a checkpoint is complete at the end of the second step after its last rank
        finished writing."""
        if self.pending is None:
            return None
        busy = self._written_vote.post([0.0 if self.pending.written_here() else 1.0])
        return self.wait() if busy is not None and busy[0] == 0 else None

    def wait(self) -> SaveTimes | None:
        """Collective while a save is pending: wait for its write and commit it."""
        if self.pending is None:
            return None
        if self._written_vote is not None:
            self._written_vote.collect()  # a poll's vote still in flight (the same on every rank)
        write, self.pending = self.pending, None
        return self._commit(write)

    def _commit(self, write: CheckpointWrite) -> SaveTimes:
        times = write.commit()
        self.saves.append(times)
        if self.info.is_main:  # only now: the older ones are the newest complete ones until this commit
            for _, old in self.complete_steps()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return times

    def close(self) -> None:
        """Release the stager. A save still pending here (training raised: other ranks may be gone,
        so no collective) is left uncommitted; its ``.tmp-`` folder is removed at the next start."""
        self.pending = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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
