"""``gptforge generate CHECKPOINT``: continue prompts with a trained model.

The checkpoint (any parallel layout) is consolidated into this one process, each prompt is prefilled
once into a KV cache and continued as ``--num-sequences`` sequences in one batch; a sequence ends at
``<|endoftext|>``, after ``--max-new-tokens``, or when prompt plus continuation fill the model's
context. Prompts longer than that are an error, never cut silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from ..model.sample import Generation, SamplingConfig, SamplingError, check_prompt, generate


@dataclass(kw_only=True, frozen=True)
class PromptSource:
    """One --prompt or --prompt-file, kept in command-line order."""

    flag: str
    """``--prompt`` or ``--prompt-file``."""
    value: str
    """The prompt text, or the path of the file that holds it."""


@dataclass(kw_only=True)
class Prompt:
    label: str
    """How errors name it: ``--prompt #2`` or ``--prompt-file notes.txt``."""
    text: str


def _source(flag: str):
    return lambda value: PromptSource(flag=flag, value=value)


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="continue prompts with a trained model (KV cache)",
        description="Sample continuations of each prompt from a checkpoint of any parallel layout. A sequence "
                    "ends at <|endoftext|>, after --max-new-tokens, or when prompt plus continuation fill the "
                    "model's context; a prompt that does not leave room for one new token is an error.")
    p.add_argument("checkpoint", help="a step_NNNNNNNN folder, a checkpoints/ folder or a run folder "
                                      "(the newest complete checkpoint in it)")
    p.add_argument("--prompt", dest="prompts", action="append", type=_source("--prompt"), default=[],
                   metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompt-file", dest="prompts", action="append", type=_source("--prompt-file"),
                   metavar="FILE", help="a UTF-8 file whose whole text (less one final newline) is one prompt; "
                                        "repeatable, in order with --prompt")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=100, help="per sequence (default 100)")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, metavar="K", default=None,
                   help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0,
                   help="nucleus sampling: the most likely tokens holding probability P, in (0, 1] (default 1.0)")
    p.add_argument("--num-sequences", type=int, metavar="N", default=1,
                   help="continuations per prompt, one batch (default 1)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="same seed and flags -> same text (default 0)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: prompt, prompt_tokens, sequences (text, new_tokens, "
                        "finish_reason)")
    p.set_defaults(func=cmd_generate)
    return p


def sampling_config(args: argparse.Namespace, stop_token: int | None) -> SamplingConfig:
    """The sampling settings of the flags; a ValueError naming every bad flag."""
    try:
        return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, num_sequences=args.num_sequences, stop_token=stop_token)
    except SamplingError as err:
        raise ValueError("; ".join(f"--{field.replace('_', '-')} {text}"
                                   for field, text in err.problems.items())) from None


def read_prompts(sources: list[PromptSource]) -> list[Prompt]:
    if not sources:
        raise ValueError("give at least one --prompt TEXT or --prompt-file FILE")
    prompts = []
    for i, source in enumerate(sources, start=1):
        if source.flag == "--prompt-file":
            label = f"--prompt-file {source.value}"
            try:
                with open(source.value, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{label}: cannot read it as UTF-8 text ({err})") from None
            # Editors end files with a newline that is not meant as part of the prompt.
            text = text[:-1] if text.endswith("\n") else text
        else:
            label, text = f"--prompt #{i}", source.value
        if not text:
            raise ValueError(f"{label} is empty: a prompt needs at least one character")
        prompts.append(Prompt(label=label, text=text))
    return prompts


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def cmd_generate(args: argparse.Namespace) -> int:
    from ..data_prep.tokenization.tokenizer import Tokenizer
    from ..training.trained_model import load_trained_model

    # Every flag is checked before the (possibly large) checkpoint is read.
    sampling_config(args, stop_token=None)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    prompts = read_prompts(args.prompts)
    device = parse_device(args.device)

    trained = load_trained_model(args.checkpoint, device=device)
    print(f"checkpoint {trained.checkpoint} (step {trained.state.get('step')})", file=sys.stderr)
    tokenizer = Tokenizer(trained.tokenizer_path)
    settings = sampling_config(args, stop_token=tokenizer.eod)
    encoded = []
    for prompt in prompts:  # all prompts are checked before any output
        ids = tokenizer.encode(prompt.text)
        try:
            check_prompt(ids, trained.model)
        except ValueError as err:
            raise ValueError(f"{prompt.label}: {err}") from None
        encoded.append(ids)

    # One generator for the whole command: the same command and seed print the same text.
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for number, (prompt, ids) in enumerate(zip(prompts, encoded), start=1):
        result = generate(trained.model, ids, settings, generator=generator)
        print(render(prompt, number, result, tokenizer, as_json=args.json), flush=True)
    return 0


# How the text output names each finish_reason (the JSON output keeps the short names).
_ENDED_BY = {"stop": "<|endoftext|>", "length": "--max-new-tokens", "context": "the full model context"}


def render(prompt: Prompt, number: int, result: Generation, tokenizer, *, as_json: bool) -> str:
    texts = [tokenizer.decode(seq) for seq in result.sequences]
    if as_json:
        sequences = [{"text": text, "new_tokens": len(seq), "finish_reason": reason}
                     for text, seq, reason in zip(texts, result.sequences, result.finish_reasons)]
        return json.dumps({"prompt": prompt.text, "prompt_tokens": result.prompt_tokens, "sequences": sequences},
                          ensure_ascii=False)
    blocks = []
    total = len(texts)
    for i, (text, seq, reason) in enumerate(zip(texts, result.sequences, result.finish_reasons), start=1):
        blocks.append(f"=== prompt {number}, sequence {i}/{total}: {result.prompt_tokens} prompt + {len(seq)} new "
                      f"tokens, ended by {_ENDED_BY[reason]} ===\n{prompt.text}{text}")
    return "\n".join(blocks)
