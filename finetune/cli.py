"""``gptforge finetune``: GPT-1 supervised fine-tuning (command-table module of ``launcher/cli.py``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Overrides are key.sub=value (YAML values), e.g. train.epochs=1. Guide: docs/evaluation.md."
    p.add_argument("--config", required=True, help="a YAML file like configs/finetune/example-classification.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value")


def run(args: argparse.Namespace) -> int:
    from .finetune import finetune, resolve_config

    cfg = resolve_config(args.config, list(args.overrides))
    metrics = finetune(cfg)
    print(json.dumps({k: metrics[k] for k in ("eval_accuracy", "chance_accuracy", "steps", "model_dir")}))
    return 0
