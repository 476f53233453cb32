"""``gptforge export-hf`` and ``gptforge import-hf`` (command-table module of ``launcher/cli.py``:
``add_export_arguments``/``run_export`` and ``add_import_arguments``/``run_import``)."""

from __future__ import annotations

import argparse


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Writes config.json, model.safetensors, generation_config.json, the tokenizer files and "
                     "README.md; refuses models GPT-2 cannot express.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a step folder, checkpoints folder or run folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new folder is complete")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the export with transformers to compare its logits with ours")


def run_export(args: argparse.Namespace) -> int:
    from .hf_export import export_hf

    out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite, verify=not args.no_verify)
    print(f"exported {args.checkpoint} to {out} (transformers GPT-2 folder)")
    return 0


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="folder with config.json, the weights and a byte-level BPE tokenizer")
    p.add_argument("run_dir", metavar="OUT_RUN_DIR", help="the run folder to start (run.dir of the train config)")
    p.add_argument("--pad-vocab-multiple", type=int, default=1,
                   help="embedding rows padded to a multiple of this (default 1: GPT-2's distribution exactly)")


def run_import(args: argparse.Namespace) -> int:
    from .hf_import import import_hf

    path = import_hf(args.input, args.run_dir, pad_vocab_multiple=args.pad_vocab_multiple)
    print(f"imported {args.input} as {path}; continue pretraining with run.dir={args.run_dir} "
          f"and model.pad_vocab_multiple={args.pad_vocab_multiple}, on data tokenized with {path}/tokenizer.json")
    return 0
