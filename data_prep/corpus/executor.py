"""Running the corpus stages: locally (a process pool per stage) or as SLURM job arrays.

A build is a fixed sequence of stages (``corpus_stages.STAGES``); a stage is one task per input shard
or a single task. A task that finished left a completion marker (``<work>/<stage>/task_NNNNN.done.json``,
written after its outputs were renamed into place), so every executor submits only the tasks without
one: a rerun after a crash or a kill redoes exactly the unfinished work.

SLURM: one job array per stage (one array task per shard), each stage waiting for the previous one with
``--dependency=afterok`` (and ``--kill-on-invalid-dep=yes``, so a failed stage cancels the rest instead
of leaving them pending forever); the clustering and report stages are single jobs.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from ...common.atomic import atomic_write_text
from ...common.errors import UserError


class CorpusBuildError(UserError):
    """Tasks that failed (each named with its stage, shard and log or error). A UserError so the command
    line reports it as a message: each task's own error or log is named in it, and a rerun redoes
    only those tasks."""


@dataclass(kw_only=True, frozen=True)
class StageSpec:
    name: str
    per_shard: bool
    """One task per input shard (a job array under SLURM), else a single task."""


def marker_path(work_dir: str, stage: str, index: int) -> str:
    return os.path.join(work_dir, stage, f"task_{index:05d}.done.json")


def pending_tasks(work_dir: str, stage: StageSpec, n_shards: int) -> list[int]:
    count = n_shards if stage.per_shard else 1
    return [i for i in range(count) if not os.path.isfile(marker_path(work_dir, stage.name, i))]


def _run_one(args: tuple[str, str, int]) -> tuple[int, str | None]:
    from .stages import run_task

    config_path, stage, index = args
    try:
        run_task(config_path, stage, index)
        return index, None
    except Exception as err:  # reported per task; the stage fails after the others finished
        return index, f"{err.__class__.__name__}: {err}"


def run_local(*, config_path: str, work_dir: str, stages: list[StageSpec], n_shards: int, workers: int,
              progress: bool = True, log=print) -> None:
    """Each stage's pending tasks over ``workers`` processes; a stage with a failed task stops the build."""
    from tqdm import tqdm

    for stage in stages:
        todo = pending_tasks(work_dir, stage, n_shards)
        total = n_shards if stage.per_shard else 1
        if not todo:
            log(f"stage {stage.name}: {total}/{total} tasks already done, skipped")
            continue
        jobs = [(config_path, stage.name, i) for i in todo]
        bar = tqdm(total=len(jobs), desc=f"{stage.name}", unit="task", disable=not progress, file=sys.stderr)
        failures = []
        if workers > 1 and len(jobs) > 1:
            # A pool that notices a worker killed from outside (the OOM killer): its tasks fail with
            # BrokenProcessPool instead of waiting forever, and the build stops with a message.
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_run_one, job): job[2] for job in jobs}
                for future in as_completed(futures):
                    bar.update()
                    try:
                        index, error = future.result()
                    except BrokenProcessPool:
                        index, error = futures[future], "its worker process died (killed, or out of memory)"
                    if error:
                        failures.append(f"{stage.name} task {index}: {error}")
        else:
            for job in jobs:
                index, error = _run_one(job)
                bar.update()
                if error:
                    failures.append(f"{stage.name} task {index}: {error}")
        bar.close()
        if failures:
            raise CorpusBuildError(f"{len(failures)} task(s) failed; finished ones are kept, rerun to redo the "
                                   f"rest:\n  " + "\n  ".join(failures))
        log(f"stage {stage.name}: {len(todo)} task(s) run, {total - len(todo)} already done")


@dataclass(kw_only=True, frozen=True)
class SlurmOptions:
    python: str
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int = 1
    mem: str | None = None
    max_parallel: int | None = None
    """At most this many array tasks of a stage at once (``--array=...%N``)."""
    extra_args: tuple[str, ...] = ()


def _sbatch(args: list[str], env: dict) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CorpusBuildError(f"sbatch {' '.join(shlex.quote(a) for a in args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_slurm(*, config_path: str, work_dir: str, stages: list[StageSpec], n_shards: int,
                 options: SlurmOptions, log=print) -> list[str]:
    """Submit every stage with pending tasks, chained by ``afterok``; returns the job ids."""
    script_dir = os.path.join(work_dir, "slurm")
    os.makedirs(os.path.join(script_dir, "logs"), exist_ok=True)
    env = dict(os.environ)
    previous, job_ids = None, []
    for stage in stages:
        todo = pending_tasks(work_dir, stage, n_shards)
        if not todo:
            log(f"stage {stage.name}: all tasks already done, not submitted")
            continue
        script = os.path.join(script_dir, f"{stage.name}.sbatch")
        command = [options.python, "-m", "gptforge.launcher.cli", "corpus", "task", "--config", config_path,
                   "--stage", stage.name, "--index"]
        atomic_write_text(script, "#!/bin/bash\nset -euo pipefail\nexec " + " ".join(shlex.quote(c) for c in command)
                          + ' "${SLURM_ARRAY_TASK_ID:-0}"\n')
        args = [f"--job-name=corpus-{stage.name}", f"--cpus-per-task={options.cpus_per_task}", "--ntasks=1",
                f"--output={os.path.join(script_dir, 'logs', f'{stage.name}_%A_%a.out')}"]
        array = ",".join(str(i) for i in todo)
        args.append(f"--array={array}" + (f"%{options.max_parallel}" if options.max_parallel else ""))
        if options.partition:
            args.append(f"--partition={options.partition}")
        if options.time:
            args.append(f"--time={options.time}")
        if options.mem:
            args.append(f"--mem={options.mem}")
        if previous:
            args += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        args += list(options.extra_args)
        previous = _sbatch(args + [script], env)
        job_ids.append(previous)
        log(f"stage {stage.name}: submitted job {previous} ({len(todo)} array task(s))")
    return job_ids


def wait_slurm(job_ids: list[str], *, poll_seconds: float = 2.0, timeout: float | None = None) -> None:
    """Block until none of ``job_ids`` is queued or running."""
    start = time.monotonic()
    while job_ids:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if proc.returncode == 0 and not proc.stdout.strip():
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise CorpusBuildError(f"SLURM jobs {', '.join(job_ids)} still queued after {timeout:.0f}s")
        time.sleep(poll_seconds)


def unfinished(work_dir: str, stages: list[StageSpec], n_shards: int) -> list[str]:
    """Tasks still without a marker, each with where to look (its SLURM log when there is one)."""
    out = []
    logs = os.path.join(work_dir, "slurm", "logs")
    names = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
    for stage in stages:
        for index in pending_tasks(work_dir, stage, n_shards):
            found = [n for n in names if n.startswith(f"{stage.name}_") and n.endswith(f"_{index}.out")]
            where = f" (log {os.path.join(logs, found[-1])})" if found else ""
            out.append(f"{stage.name} task {index}{where}")
    return out
