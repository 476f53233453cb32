"""What a resume must find unchanged: the tokenizer, the data and the batch schedule of the run.

A checkpoint records these (``trainer_state.json`` -> ``"resume_identity"``). Resuming with another
tokenizer, data mix, split, data seed, sequence length or batch schedule would silently train on other
samples (the data position is a sample count, meaningful only for the same sample sequence), so it is
refused, naming every difference, unless ``checkpoint.allow_changes`` lists the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import ResolvedJob

RESUME_KEYS = ("tokenizer", "data.sources", "data.split", "data.seed", "train.seq_len", "train.global_batch_size",
               "optim.batch_ramp_start_tokens", "optim.batch_ramp_tokens")
"""The keys ``checkpoint.allow_changes`` accepts. The model's shape is checked separately and cannot
be allowed to change."""


def resume_identity(job: ResolvedJob) -> dict:
    """This run's values of ``RESUME_KEYS`` (JSON-ready)."""
    cfg = job.job
    return {
        "tokenizer": job.tokenizer_sha,
        "data.sources": [[s.path, s.weight] for s in cfg.data.sources],
        "data.split": cfg.data.split,
        "data.seed": cfg.data.seed,
        "train.seq_len": job.seq_len,
        "train.global_batch_size": cfg.train.global_batch_size,
        "optim.batch_ramp_start_tokens": cfg.optim.batch_ramp_start_tokens,
        "optim.batch_ramp_tokens": cfg.optim.batch_ramp_tokens,
    }


def _show(key: str, value) -> str:
    if key == "tokenizer" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return repr(value)


def resume_changes(saved_state: dict, job: ResolvedJob) -> dict[str, tuple[object, object]]:
    """key -> (checkpoint value, config value) for every recorded key that differs. A checkpoint that
    holds only weights (``weights_only``: an imported model) starts a new data sequence: only its
    tokenizer is compared."""
    saved = dict(saved_state.get("resume_identity") or {})
    if "tokenizer" not in saved and saved_state.get("tokenizer_sha256"):
        saved["tokenizer"] = saved_state["tokenizer_sha256"]
    if saved_state.get("weights_only"):
        saved = {k: v for k, v in saved.items() if k == "tokenizer"}
    current = resume_identity(job)
    return {key: (saved[key], current[key]) for key in RESUME_KEYS if key in saved and saved[key] != current[key]}


def read_trainer_state(path: str) -> dict:
    """The ``trainer_state.json`` of the checkpoint folder ``path`` (refused if it is not complete)."""
    import json
    import os

    from .checkpoint import STATE_FILE, CheckpointMismatchError, is_complete

    if not is_complete(path):
        raise CheckpointMismatchError(f"checkpoint {path!r} is not a complete gptforge checkpoint "
                                      f"(no {STATE_FILE} or .metadata)")
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def check_resume(path: str, saved_state: dict, job: ResolvedJob) -> list[str]:
    """Raise ``CheckpointMismatchError`` naming every change not in ``checkpoint.allow_changes``;
    returns one line per accepted change (for the log)."""
    from .checkpoint import CheckpointMismatchError

    changes = resume_changes(saved_state, job)
    allowed = set(job.job.checkpoint.allow_changes)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        lines = "; ".join(f"{k}: checkpoint {_show(k, a)}, config {_show(k, b)}" for k, (a, b) in refused.items())
        keys = ",".join(refused)
        raise CheckpointMismatchError(
            f"checkpoint {path!r} was written by a run with other data or batches ({lines}); resume with the "
            f"config it was trained with, accept the change with checkpoint.allow_changes=[{keys}], or start "
            f"a new run.dir")
    return [f"{k}: {_show(k, a)} -> {_show(k, b)}" for k, (a, b) in changes.items()]
