"""Run a test's function on several gloo ranks on the CPU, from inside the test (no torchrun, no command).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes (torch.multiprocessing, ``spawn``),
joins them in a process group on a free local port and calls ``fn(rank, world_size, *args)`` on each. If a
rank raises, the calling test fails with the tracebacks of the ranks that raised, the earliest first (the
others usually fail because of it, in a collective it left). Every rank destroys its group however ``fn``
ends. ``fn`` and its arguments must be picklable: a module-level function of a test module, plain values.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import free_port

# A rank that waits on a collective its peer never joins (because the peer failed) gives up after this,
# instead of gloo's default of 30 minutes; run_distributed stops the processes after DEADLINE_S anyway.
COLLECTIVE_TIMEOUT_S = 60
DEADLINE_S = 300


class DistributedTestError(AssertionError):
    """A rank of ``run_distributed`` failed; the message holds its traceback."""


def _record_failure(error_dir: str, rank: int) -> None:
    with open(os.path.join(error_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "time": time.time(), "traceback": traceback.format_exc()}, handle)


def _worker(rank: int, fn, world_size: int, port: int, args: tuple, error_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores: one thread each, no oversubscription
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except Exception:
        _record_failure(error_dir, rank)
        raise
    try:
        fn(rank, world_size, *args)
    except Exception:
        _record_failure(error_dir, rank)  # before the group ends: its peers fail only after that
        raise
    finally:
        # Free what fn built (DeepSpeed's engine lives in reference cycles) while the interpreter and
        # the process group are whole, not in the interpreter's teardown, where it can abort the rank.
        gc.collect()
        dist.destroy_process_group()


def _failures(error_dir: str, world_size: int) -> str:
    """The tracebacks the ranks left, the earliest first."""
    errors = []
    for name in os.listdir(error_dir):
        with open(os.path.join(error_dir, name)) as handle:
            errors.append(json.load(handle))
    errors.sort(key=lambda error: error["time"])
    first = " first" if len(errors) > 1 else ""
    return "\n".join(f"rank {e['rank']} of {world_size} raised{first if i == 0 else ''}:\n{e['traceback']}"
                     for i, e in enumerate(errors))


def run_distributed(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any rank fails."""
    with tempfile.TemporaryDirectory(prefix="run_distributed-") as error_dir:
        # One OpenMP thread per rank from the start (a child reads it when it imports torch).
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            context = mp.start_processes(_worker, args=(fn, world_size, free_port(), args, error_dir),
                                         nprocs=world_size, join=False, start_method="spawn")
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise DistributedTestError(f"{world_size} ranks still running after {DEADLINE_S} s")
        except mp.ProcessRaisedException:
            raise DistributedTestError(_failures(error_dir, world_size)) from None
        except mp.ProcessExitedException as error:  # killed, or died without a Python exception
            raise DistributedTestError(f"rank {error.error_index} of {world_size} exited with code "
                                       f"{error.exit_code} (signal: {error.signal_name})\n"
                                       + _failures(error_dir, world_size)) from None
        finally:
            for process in context.processes:  # after a failure: stop the ranks still waiting on it
                if process.is_alive():
                    process.kill()
                process.join()
