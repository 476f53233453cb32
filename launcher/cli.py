"""``gptforge <command>``: the one console script.

Commands: ``tokenizer train``, ``tokenize``, ``train``, ``plan``, ``files-to-jsonl``. Bad input ends with
``error: ...`` lines naming the flag, key or file, and exit status 2, never a traceback
(set GPTFORGE_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from gptforge.data_prep.tokenizer import train_tokenizer

    result = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, text_field=args.text_field,
                             max_documents=args.max_documents, num_threads=args.threads)
    print(f"tokenizer {result.model_path}: vocab {result.vocab_size}, trained on {result.documents} documents; "
          f"{result.skips.summary()}")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from gptforge.data_prep.indexed_writer import tokenize_to_indexed

    result = tokenize_to_indexed(args.input, args.output, args.tokenizer, text_field=args.text_field,
                                 workers=args.workers, append_eod=not args.no_eod, progress=not args.quiet)
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens in "
          f"{result.seconds:.1f}s; {result.skips.summary()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gptforge.launcher.job import resolve_job
    from gptforge.launcher.train import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    job = resolve_job(args.config, overrides)  # every config error, before any process group starts
    train(job)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from gptforge.launcher.plan import plan_rows, render_table

    rows = plan_rows(args.preset, micro_batch=args.micro_batch, seq_len=args.seq, precision=args.precision)
    print(json.dumps(rows, indent=2) if args.json else render_table(rows))
    return 0


def _cmd_files_to_jsonl(args: argparse.Namespace) -> int:
    from gptforge.data_prep.text_files import files_to_jsonl

    count, skipped = files_to_jsonl(args.root, args.glob or ["**/*.txt"], args.output, min_chars=args.min_chars)
    print(f"wrote {count} documents to {args.output}; skipped {skipped} file(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="GPT-1/2/3 pretraining: data, training, planning.")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a SentencePiece BPE model with byte fallback and <|endoftext|>")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("tokenize", help="JSONL/Parquet documents -> Megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model from 'gptforge tokenizer train'")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|> after each document")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("train", help="pretrain a GPT from a YAML config",
                       description="Overrides are key.sub=value (YAML values), e.g. train.max_steps=100.")
    p.add_argument("--config", required=True, help="a YAML file in configs/")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint), 'none', or a checkpoint dir")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="parameters and single-replica memory of presets (meta device, no allocation)")
    p.add_argument("--preset", action="append", required=True,
                   help="a preset name, 'gpt3' for the eight GPT-3 sizes or 'all'; repeatable")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("files-to-jsonl", help="collect text files under a folder into one JSONL of documents")
    p.add_argument("root")
    p.add_argument("--glob", action="append", help="pattern under ROOT, repeatable (default **/*.txt)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--min-chars", type=int, default=1)
    p.set_defaults(func=_cmd_files_to_jsonl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError and CheckpointMismatchError are ValueErrors
        if os.environ.get("GPTFORGE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
