"""``gptforge corpus build`` and ``gptforge corpus task``: the command-line side of the corpus stages
(command-table module of ``launcher/cli.py``: ``add_build_arguments``/``run_build`` and
``add_task_arguments``/``run_task``)."""

from __future__ import annotations

import argparse
import json


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Overrides are key.sub=value (YAML values), e.g. executor.workers=4. "
                     "A rerun skips the finished shards of every stage.")
    p.add_argument("--config", required=True, help="a YAML file such as configs/data/commoncrawl.yaml")
    p.add_argument("--executor", choices=["local", "slurm"], default=None, help="overrides executor.kind")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes (overrides executor.workers; local executor only)")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return without waiting")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key.sub=value")


def run_build(args: argparse.Namespace) -> int:
    from .build import build_corpus

    result = build_corpus(args.config, list(args.overrides), executor=args.executor, workers=args.workers,
                          wait=not args.no_wait, progress=not args.quiet)
    print(result)
    return 0


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the resolved config.json of a build's work folder")
    p.add_argument("--stage", required=True)
    p.add_argument("--index", type=int, required=True, help="shard index (SLURM_ARRAY_TASK_ID)")


def run_task(args: argparse.Namespace) -> int:
    import os

    from ...common.errors import UserError
    from .stages import STAGES, run_task as run_stage_task

    names = [stage.name for stage in STAGES]
    if args.stage not in names:
        raise UserError(f"--stage must be one of {', '.join(names)}, got {args.stage!r}")
    if not os.path.isfile(args.config):
        raise UserError(f"--config: no such plan file {args.config!r} (written by 'gptforge corpus build')")
    stats = run_stage_task(args.config, args.stage, args.index)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))
    return 0
