"""``gptforge files-to-jsonl ROOT -o OUT``: text files under a folder -> one JSONL of documents."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root")
    parser.add_argument("--glob", action="append", help="pattern under ROOT, repeatable (default **/*.txt)")
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--min-chars", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from .text_files import files_to_jsonl

    count, skipped = files_to_jsonl(args.root, args.glob or ["**/*.txt"], args.output, min_chars=args.min_chars)
    print(f"wrote {count} documents to {args.output}; skipped {skipped} file(s)")
    return 0
