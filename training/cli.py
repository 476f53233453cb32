"""``gptforge train``: pretrain a GPT from a YAML config (the command-table module of ``launcher/cli.py``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Overrides are key.sub=value (YAML values), e.g. train.max_steps=100."
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint), 'none', or a checkpoint dir")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")


def run(args: argparse.Namespace) -> int:
    from .job import resolve_job
    from .trainer import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    job = resolve_job(args.config, overrides)  # every config error, before any process group starts
    train(job)
    return 0
