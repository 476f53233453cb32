"""``gptforge tokenizer train`` and ``gptforge tokenize`` (command-table module of ``launcher/cli.py``:
``add_train_arguments``/``run_train`` and ``add_tokenize_arguments``/``run_tokenize``)."""

from __future__ import annotations

import argparse
import os

from ...common.errors import UserError
from ..readers.documents import check_input_files
from .tokenizer import SENTENCEPIECE, TOKENIZER_KINDS


def add_tokenizer_kind_argument(parser: argparse.ArgumentParser) -> None:
    """``--kind`` of ``gptforge tokenizer train``."""
    parser.add_argument("--kind", choices=TOKENIZER_KINDS, default=SENTENCEPIECE,
                        help="sentencepiece: BPE with byte fallback, writes PREFIX.model (default); byte-bpe: "
                             "GPT-2's byte-level BPE, writes PREFIX.json, PREFIX.vocab.json, PREFIX.merges.txt")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    parser.add_argument("--output", required=True,
                        help="output prefix: PREFIX.model (+.vocab) for sentencepiece; "
                             "PREFIX.json, PREFIX.vocab.json, PREFIX.merges.txt for byte-bpe")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    parser.add_argument("--threads", type=int, default=1)
    add_tokenizer_kind_argument(parser)


def run_train(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer_of_kind

    errors = check_input_files(args.input, "tokenizer train: --input")
    if errors:
        raise UserError("\n".join(errors))
    result = train_tokenizer_of_kind(args.kind, args.input, args.output, vocab_size=args.vocab_size,
                                     text_field=args.text_field, max_documents=args.max_documents,
                                     num_threads=args.threads)
    print(f"tokenizer {result.model_path} ({args.kind}): vocab {result.vocab_size}, trained on {result.documents} "
          f"documents; {result.skips.summary()}")
    return 0


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--tokenizer", required=True,
                        help="a .model or byte-BPE .json from 'gptforge tokenizer train'")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|> after each document")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_tokenize(args: argparse.Namespace) -> int:
    from .indexed_writer import tokenize_to_indexed

    if not os.path.isfile(args.tokenizer):
        raise UserError(f"tokenize: --tokenizer: no such file {args.tokenizer!r}; train one with "
                        f"'gptforge tokenizer train'")
    result = tokenize_to_indexed(args.input, args.output, args.tokenizer, text_field=args.text_field,
                                 workers=args.workers, append_eod=not args.no_eod, progress=not args.quiet)
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens in "
          f"{result.seconds:.1f}s; {result.skips.summary()}")
    return 0
