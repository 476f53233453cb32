"""``gptforge corpus build``: resolve the config, then run every stage locally or on SLURM."""

from __future__ import annotations

import json
import os
import sys

from ...common.errors import UserError
from .config import resolve_corpus
from .executor import (CorpusBuildError, SlurmOptions, run_local, submit_slurm, unfinished,
                                                wait_slurm)
from .stages import STAGES, prepare


def build_corpus(config_path: str, overrides: list[str], *, executor: str | None = None, workers: int | None = None,
                 wait: bool = True, progress: bool = True, log=print) -> str:
    """Build (or finish building) the corpus of ``config_path``; returns a one-paragraph summary.

    ``executor`` and ``workers`` (``--executor``, ``--workers``) override ``executor.kind`` and
    ``executor.workers``; ``wait=False`` (``--no-wait``) returns once the SLURM jobs are submitted. A flag
    that does not apply to the executor chosen (``--workers`` under SLURM, ``--no-wait`` locally) is an
    error rather than ignored.
    """
    overrides = list(overrides)
    if executor is not None:
        overrides.append(f"executor.kind={executor}")
    if workers is not None:
        overrides.append(f"executor.workers={workers}")
    plan = resolve_corpus(config_path, overrides)
    cfg = plan.cfg
    kind = f"--executor {cfg.executor.kind}" if executor else f"executor.kind={cfg.executor.kind}"
    if workers is not None and cfg.executor.kind == "slurm":
        raise UserError(f"--workers applies to the local executor only, not with {kind} (each SLURM array task "
                        f"runs one shard; size them with executor.slurm.cpus_per_task and max_parallel)")
    if not wait and cfg.executor.kind == "local":
        raise UserError(f"--no-wait applies to --executor slurm only, not with {kind} (a local build runs in "
                        f"this process)")
    log(f"corpus build: {plan.n_shards} input shard(s) -> {cfg.output.dir} (work folder {plan.work_dir})")
    prepare(plan)
    if cfg.executor.kind == "local":
        run_local(config_path=plan.plan_path, work_dir=plan.work_dir, stages=STAGES, n_shards=plan.n_shards,
                  workers=cfg.executor.workers, progress=progress, log=log)
    else:
        s = cfg.executor.slurm
        options = SlurmOptions(python=s.python or sys.executable, partition=s.partition, time=s.time,
                               cpus_per_task=s.cpus_per_task, mem=s.mem, max_parallel=s.max_parallel,
                               extra_args=tuple(s.extra_args))
        job_ids = submit_slurm(config_path=plan.plan_path, work_dir=plan.work_dir, stages=STAGES,
                               n_shards=plan.n_shards, options=options, log=log)
        if not wait:
            return f"submitted SLURM job(s) {', '.join(job_ids) or '(none: all done)'}; rerun to check or finish"
        wait_slurm(job_ids)
        left = unfinished(plan.work_dir, STAGES, plan.n_shards)
        if left:
            raise CorpusBuildError(f"{len(left)} task(s) did not finish; rerun to redo them:\n  " + "\n  ".join(left))
    with open(os.path.join(cfg.output.dir, "report.json"), encoding="utf-8") as handle:
        totals = json.load(handle)["totals"]
    removed = ", ".join(f"{k} {v}" for k, v in totals["removed"].items()) or "nothing"
    return (f"corpus {cfg.output.dir}: {totals['docs_in']} documents in, {totals['docs_out']} out "
            f"({totals['bytes_out']:,} bytes of text); removed: {removed}; skipped inputs: {totals['skipped']}; "
            f"report.json and plots in {cfg.output.dir}")
