"""``gptforge corpus build``: resolve the config, then run every stage locally or on SLURM."""

from __future__ import annotations

import json
import os

from .config import resolve_corpus
from .executor import (CorpusBuildError, SlurmOptions, run_local, submit_slurm, unfinished,
                                                wait_slurm)
from .stages import STAGES, prepare


def build_corpus(config_path: str, overrides: list[str], *, wait: bool = True, progress: bool = True,
                 log=print) -> str:
    """Build (or finish building) the corpus of ``config_path``; returns a one-paragraph summary."""
    plan = resolve_corpus(config_path, overrides)
    cfg = plan.cfg
    log(f"corpus build: {plan.n_shards} input shard(s) -> {cfg.output.dir} (work folder {plan.work_dir})")
    prepare(plan)
    if cfg.executor.kind == "local":
        run_local(config_path=plan.plan_path, work_dir=plan.work_dir, stages=STAGES, n_shards=plan.n_shards,
                  workers=cfg.executor.workers, progress=progress, log=log)
    else:
        s = cfg.executor.slurm
        options = SlurmOptions(python=s.python or os.sys.executable, partition=s.partition, time=s.time,
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
