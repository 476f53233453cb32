"""``gptforge <command>``: the one console script, a table of commands loaded on demand.

``COMMANDS`` maps each command (its words, e.g. ``"corpus build"``) to the module that implements it
and a one-line help. The convention of a command module:

- target ``"package.module"``: the module exposes ``add_arguments(parser)`` (the command's flags, and its
  ``parser.description`` when it has one) and ``run(args) -> int`` (the exit status);
- target ``"package.module:name"``: a module serving several commands exposes one such pair per command,
  ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``.

``run`` turns the parsed flags into the typed keyword arguments of library functions (which never see an
``argparse.Namespace``). Only the chosen command's module is imported, so ``gptforge --help`` imports
none and ``gptforge dedup --help`` only dedup's (the data commands never import torch).

Errors: a ``UserError`` (bad input: a flag, a config key, a file; ``ConfigError`` is one) ends with
``error: ...`` and exit status 2 (set GPTFORGE_DEBUG=1 to see its traceback too); any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from ..common.errors import UserError


@dataclass(kw_only=True, frozen=True)
class Command:
    """One entry of the command table."""

    target: str
    """``"package.module"`` or ``"package.module:name"`` (see the module docstring)."""
    help: str
    """The line ``gptforge --help`` shows for it."""


COMMANDS: dict[str, Command] = {
    "tokenizer train": Command(target="gptforge.data_prep.tokenization.cli:train",
                               help="train a tokenizer with <|endoftext|>: SentencePiece BPE with byte fallback "
                                    "(default) or GPT-2's byte-level BPE"),
    "tokenize": Command(target="gptforge.data_prep.tokenization.cli:tokenize",
                        help="JSONL/Parquet documents -> Megatron indexed dataset (.bin/.idx)"),
    "train": Command(target="gptforge.training.cli", help="pretrain a GPT from a YAML config"),
    "plan": Command(target="gptforge.parallel.plan_cli",
                    help="parameters and memory of presets: one replica, per GPU under a layout, or the "
                         "layouts of N GPUs that fit (nothing allocated)"),
    "files-to-jsonl": Command(target="gptforge.data_prep.readers.cli",
                              help="collect text files under a folder into one JSONL of documents"),
    "dedup": Command(target="gptforge.data_prep.dedup.cli",
                     help="remove URL, exact and near-duplicate (MinHash LSH) documents"),
    "corpus build": Command(target="gptforge.data_prep.corpus.cli:build",
                            help="read -> extract -> language -> quality -> dedup -> decontaminate -> write"),
    "corpus task": Command(target="gptforge.data_prep.corpus.cli:task",
                           help="run one task of one stage (what each SLURM array task runs)"),
    "quality train": Command(target="gptforge.data_prep.filters.cli",
                             help="fit the classifier: reference text (positives) vs raw crawl (negatives)"),
    "generate": Command(target="gptforge.evaluation.cli:generate",
                        help="continue prompts with a trained model (KV cache)"),
    "eval": Command(target="gptforge.evaluation.cli:eval",
                    help="validation perplexity and zero/one/few-shot tasks of a checkpoint"),
    "finetune": Command(target="gptforge.finetune.cli",
                        help="GPT-1 supervised fine-tuning of a checkpoint (classification, entailment, ...)"),
    "export-hf": Command(target="gptforge.interop.cli:export",
                         help="checkpoint -> a Hugging Face transformers GPT-2 folder"),
    "import-hf": Command(target="gptforge.interop.cli:import",
                         help="a local transformers GPT-2 folder -> a checkpoint to continue pretraining from "
                              "(OUT_RUN_DIR/checkpoints/step_00000000)"),
}

GROUPS: dict[str, str] = {
    "tokenizer": "tokenizer commands",
    "corpus": "build a filtered, deduplicated corpus from web data",
    "quality": "the GPT-3 quality classifier",
}
"""The help of each first word that names a group of commands rather than a command."""


def chosen_command(argv: list[str]) -> str | None:
    """The table key that ``argv`` starts with (its leading words before any option), or None."""
    words: list[str] = []
    for token in argv:
        if token.startswith("-"):
            return None
        words.append(token)
        key = " ".join(words)
        if key in COMMANDS:
            return key
        if not any(name.startswith(key + " ") for name in COMMANDS):
            return None
    return None


def load_command(key: str):
    """``(add_arguments, run)`` of a table entry, importing its module."""
    module_name, _, name = COMMANDS[key].target.partition(":")
    module = importlib.import_module(module_name)
    if name:
        return getattr(module, f"add_{name}_arguments"), getattr(module, f"run_{name}")
    return module.add_arguments, module.run


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every command with its help; the flags only of the one ``argv`` chooses (others are not imported)."""
    parser = argparse.ArgumentParser(prog="gptforge", description="GPT-1/2/3 pretraining: data, training, planning.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = chosen_command(argv)
    groups: dict[str, argparse._SubParsersAction] = {}
    for key, command in COMMANDS.items():
        first, _, rest = key.partition(" ")
        if rest:
            if first not in groups:
                groups[first] = sub.add_parser(first, help=GROUPS[first]).add_subparsers(
                    dest=f"{first}_command", required=True)
            p = groups[first].add_parser(rest, help=command.help)
        else:
            p = sub.add_parser(key, help=command.help)
        if key == chosen:
            add_arguments, run = load_command(key)
            if p.description is None:
                p.description = command.help
            add_arguments(p)
            p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        if os.environ.get("GPTFORGE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
