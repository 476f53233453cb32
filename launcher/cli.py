"""``gptforge <command>``: the one console script.

Commands: ``tokenizer train``, ``tokenize``, ``train``, ``plan``, ``files-to-jsonl``, ``dedup``,
``corpus build``, ``corpus task``, ``quality train``, ``generate``, ``eval``, ``finetune``,
``export-hf``, ``import-hf``. Bad input ends with
``error: ...`` lines naming the flag, key or file, and exit status 2, never a traceback
(set GPTFORGE_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..data_prep.corpus.cli import add_corpus_parsers
from ..data_prep.dedup.cli import add_dedup_parser
from ..evaluation.evaluate import add_eval_parser
from ..finetune.finetune import add_finetune_parser
from ..evaluation.generate import add_generate_parser
from ..interop.cli import add_hf_parsers, add_tokenizer_kind_argument, cmd_tokenizer_train


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from ..data_prep.tokenization.indexed_writer import tokenize_to_indexed

    result = tokenize_to_indexed(args.input, args.output, args.tokenizer, text_field=args.text_field,
                                 workers=args.workers, append_eod=not args.no_eod, progress=not args.quiet)
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens in "
          f"{result.seconds:.1f}s; {result.skips.summary()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..training.job import resolve_job
    from ..training.trainer import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    job = resolve_job(args.config, overrides)  # every config error, before any process group starts
    train(job)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..parallel.plan_cli import (DEFAULT_GPU_MEMORY_GIB, LayoutFlags, plan_rows, propose_rows,
                                        render_layout_table, render_proposals, render_table)

    gpu_memory = args.gpu_memory if args.gpu_memory is not None else DEFAULT_GPU_MEMORY_GIB
    common = dict(micro_batch=args.micro_batch, seq_len=args.seq, precision=args.precision)
    if args.propose:
        # The search chooses tp, pp and dp; --zero and --recompute narrow it to the given value.
        for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--dp", args.dp)):
            if value is not None:
                raise ValueError(f"{flag} cannot be combined with --propose (the search chooses it)")
        flags = LayoutFlags(recompute_every=args.recompute_every, optimizer_offload=args.optimizer_offload,
                            sequence_parallel=not args.no_sequence_parallel, gpu_memory_gib=gpu_memory)
        rows = propose_rows(args.preset, n_gpus=args.gpus, gpus_per_node=args.gpus_per_node, flags=flags,
                            zero_stages=None if args.zero is None else [args.zero],
                            recompute=None if args.recompute is None else [args.recompute],
                            global_batch=args.global_batch, top=args.top, runnable_only=args.runnable, **common)
        print(json.dumps(rows, indent=2) if args.json else render_proposals(rows))
        return 0
    for flag, value in (("--gpus", args.gpus), ("--runnable", args.runnable or None)):
        if value is not None:
            raise ValueError(f"{flag} only applies with --propose (give --tp/--pp/--dp for one layout)")
    flags = LayoutFlags(tp=1 if args.tp is None else args.tp, pp=1 if args.pp is None else args.pp,
                        dp=1 if args.dp is None else args.dp, zero_stage=args.zero or 0,
                        recompute=args.recompute or "none", recompute_every=args.recompute_every,
                        optimizer_offload=args.optimizer_offload,
                        sequence_parallel=not args.no_sequence_parallel, gpu_memory_gib=gpu_memory)
    rows = plan_rows(args.preset, flags=flags, global_batch=args.global_batch, **common)
    print(json.dumps(rows, indent=2) if args.json else render_table(rows) + "\n\n" + render_layout_table(rows))
    return 0


def _cmd_files_to_jsonl(args: argparse.Namespace) -> int:
    from ..data_prep.readers.text_files import files_to_jsonl

    count, skipped = files_to_jsonl(args.root, args.glob or ["**/*.txt"], args.output, min_chars=args.min_chars)
    print(f"wrote {count} documents to {args.output}; skipped {skipped} file(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="GPT-1/2/3 pretraining: data, training, planning.")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a tokenizer with <|endoftext|>: SentencePiece BPE with byte fallback "
                                     "(default) or GPT-2's byte-level BPE")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    p.add_argument("--output", required=True, help="output prefix: PREFIX.model (+.vocab) for sentencepiece; "
                                                    "PREFIX.json, PREFIX.vocab.json, PREFIX.merges.txt for byte-bpe")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--threads", type=int, default=1)
    add_tokenizer_kind_argument(p)
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("tokenize", help="JSONL/Parquet documents -> Megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.jsonl.gz) or Parquet files")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer", required=True, help="a .model or byte-BPE .json from 'gptforge tokenizer train'")
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

    p = sub.add_parser("plan", help="parameters and memory of presets: one replica, per GPU under a layout, or "
                                    "the layouts of N GPUs that fit (nothing allocated)",
                       description="Per-GPU rules: parallel/planner.py; guide: docs/parallelism.md.")
    p.add_argument("--preset", action="append", required=True,
                   help="a preset name, 'gpt3' for the eight GPT-3 sizes or 'all'; repeatable")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default 1)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default 1)")
    p.add_argument("--zero", type=int, default=None,
                   help="ZeRO stage 0-3 (default 0); with --propose, only this stage")
    p.add_argument("--recompute", default=None,
                   help="none, selective (every --recompute-every-th block) or full (default none); "
                        "with --propose, only this mode")
    p.add_argument("--recompute-every", type=int, default=2, help="with --recompute selective (default 2)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU in GiB for 'fits' (default 80)")
    p.add_argument("--optimizer-offload", action="store_true", help="optimizer state and master weights on the host")
    p.add_argument("--no-sequence-parallel", action="store_true", help="tp without sequence parallelism")
    p.add_argument("--propose", action="store_true", help="list the layouts of --gpus GPUs that fit, best first")
    p.add_argument("--gpus", type=int, default=None, help="with --propose: number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --propose: the largest tp (default 8)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step: with --propose it caps dp x micro batch; both modes check the "
                        "trainer's pipeline rule of >= pp micro-batches (default: the preset's Table 2.1 batch)")
    p.add_argument("--top", type=int, default=10, help="with --propose: layouts shown per preset (default 10)")
    p.add_argument("--runnable", action="store_true",
                   help="with --propose: only layouts that 'gptforge train' accepts today")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("files-to-jsonl", help="collect text files under a folder into one JSONL of documents")
    p.add_argument("root")
    p.add_argument("--glob", action="append", help="pattern under ROOT, repeatable (default **/*.txt)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--min-chars", type=int, default=1)
    p.set_defaults(func=_cmd_files_to_jsonl)

    add_dedup_parser(sub)
    add_corpus_parsers(sub)
    add_hf_parsers(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_finetune_parser(sub)
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
