"""Command-line parsers of ``gptforge export-hf``, ``gptforge import-hf`` and the ``--kind`` option of
``gptforge tokenizer train`` (wired into the console script by ``launcher/cli.py``)."""

from __future__ import annotations

import argparse


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from .hf_export import export_hf

    out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite, verify=not args.no_verify)
    print(f"exported {args.checkpoint} to {out} (transformers GPT-2 folder)")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from .hf_import import import_hf

    path = import_hf(args.input, args.run_dir, pad_vocab_multiple=args.pad_vocab_multiple)
    print(f"imported {args.input} as {path}; continue pretraining with run.dir={args.run_dir} "
          f"and model.pad_vocab_multiple={args.pad_vocab_multiple}, on data tokenized with {path}/tokenizer.json")
    return 0


def add_hf_parsers(subparsers) -> None:
    """``export-hf`` and ``import-hf`` under the console script's subcommands."""
    p = subparsers.add_parser("export-hf", help="checkpoint -> a Hugging Face transformers GPT-2 folder",
                              description="Writes config.json, model.safetensors, generation_config.json, the "
                                          "tokenizer files and README.md; refuses models GPT-2 cannot express.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a step folder, checkpoints folder or run folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new folder is complete")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the export with transformers to compare its logits with ours")
    p.set_defaults(func=_cmd_export_hf)

    p = subparsers.add_parser("import-hf", help="a local transformers GPT-2 folder -> a checkpoint to continue "
                                                "pretraining from (OUT_RUN_DIR/checkpoints/step_00000000)")
    p.add_argument("input", metavar="IN", help="folder with config.json, the weights and a byte-level BPE tokenizer")
    p.add_argument("run_dir", metavar="OUT_RUN_DIR", help="the run folder to start (run.dir of the train config)")
    p.add_argument("--pad-vocab-multiple", type=int, default=1,
                   help="embedding rows padded to a multiple of this (default 1: GPT-2's distribution exactly)")
    p.set_defaults(func=_cmd_import_hf)


def add_tokenizer_kind_argument(parser: argparse.ArgumentParser) -> None:
    """``--kind`` of ``gptforge tokenizer train``."""
    from ..data_prep.tokenization.tokenizer import SENTENCEPIECE, TOKENIZER_KINDS

    parser.add_argument("--kind", choices=TOKENIZER_KINDS, default=SENTENCEPIECE,
                        help="sentencepiece: BPE with byte fallback, writes PREFIX.model (default); byte-bpe: "
                             "GPT-2's byte-level BPE, writes PREFIX.json, PREFIX.vocab.json, PREFIX.merges.txt")


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """``gptforge tokenizer train`` for either ``--kind``."""
    from ..data_prep.tokenization.tokenizer import train_tokenizer_of_kind

    result = train_tokenizer_of_kind(args.kind, args.input, args.output, vocab_size=args.vocab_size,
                                     text_field=args.text_field, max_documents=args.max_documents,
                                     num_threads=args.threads)
    print(f"tokenizer {result.model_path} ({args.kind}): vocab {result.vocab_size}, trained on {result.documents} "
          f"documents; {result.skips.summary()}")
    return 0
