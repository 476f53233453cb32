"""Helpers that start ``gptforge train`` as one process or as several gloo ranks (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from .faults import FAULT_ENV

GPTFORGE = [sys.executable, "-m", "gptforge.launcher.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(config: str, *extra: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return GPTFORGE + ["train", "--config", config, *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "-m", "gptforge.launcher.cli", "train", "--config", config, *extra]


TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(config: str, *extra: str, nproc: int = 1, fault: str | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``fault``: KIND@STEP of ``helpers.faults.FaultInjection``, added to the run's ``train.callbacks``."""
    # tests/ on the path: callbacks in train.callbacks may name helpers.* modules
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p))
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
        # next to the other overrides: argparse takes the positional overrides as one run of arguments
        at = next((i for i, arg in enumerate(extra) if "=" in arg and not arg.startswith("-")), len(extra))
        extra = extra[:at] + ('train.callbacks=["helpers.faults:FaultInjection"]',) + extra[at:]
    return subprocess.run(train_cmd(config, *extra, nproc=nproc), capture_output=True, text=True, env=env,
                          timeout=timeout)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def losses(run_dir) -> dict[int, float]:
    recs = records(run_dir)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), "each step logged once"
    return {r["step"]: r["loss"] for r in recs}


def config_errors(path: str, overrides=(), world_size: int = 1) -> list[str]:
    """The errors ``resolve_job`` raises for a config (fails the test when it raises none)."""
    import pytest

    from gptforge.common.config import ConfigError
    from gptforge.training.job import resolve_job

    with pytest.raises(ConfigError) as info:
        resolve_job(path, list(overrides), world_size=world_size)
    return info.value.errors
