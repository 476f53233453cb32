"""``gptforge quality train``: fit the GPT-3 quality classifier (command-table module of ``launcher/cli.py``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positive", nargs="+", required=True, help="JSONL/Parquet of reference text (WebText, books...)")
    p.add_argument("--negative", nargs="+", required=True, help="JSONL/Parquet of unfiltered crawl text")
    p.add_argument("--output", "-o", required=True, help="where to write the model file")
    p.add_argument("--text-field", default="text")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held out for the reported accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None, help="per class")


def run(args: argparse.Namespace) -> int:
    from ...common.errors import UserError
    from ..readers.documents import check_input_files
    from .classifier import train_quality_classifier

    errors = check_input_files(args.positive, "--positive") + check_input_files(args.negative, "--negative")
    if errors:
        raise UserError("; ".join(errors))
    report = train_quality_classifier(args.positive, args.negative, args.output, text_field=args.text_field,
                                      test_fraction=args.test_fraction, seed=args.seed,
                                      max_documents=args.max_documents)
    print(json.dumps(report, indent=2))
    return 0
