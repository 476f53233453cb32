"""``gptforge generate CHECKPOINT``: continue prompts with a trained model.

The checkpoint (any parallel layout) is consolidated into this one process, each prompt is prefilled
once into a KV cache and continued as ``--num-sequences`` sequences in one batch; a sequence ends at
``<|endoftext|>``, after ``--max-new-tokens``, or when prompt plus continuation fill the model's
context. Prompts longer than that are an error, never cut silently.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from ..common.errors import UserError
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


def sampling_config(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float,
                    num_sequences: int, stop_token: int | None) -> SamplingConfig:
    """The sampling settings of the flags; a UserError naming every bad flag."""
    try:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, num_sequences=num_sequences, stop_token=stop_token)
    except SamplingError as err:
        raise UserError("; ".join(f"--{field.replace('_', '-')} {text}"
                                   for field, text in err.problems.items())) from None


def read_prompts(sources: list[PromptSource]) -> list[Prompt]:
    if not sources:
        raise UserError("give at least one --prompt TEXT or --prompt-file FILE")
    prompts = []
    for i, source in enumerate(sources, start=1):
        if source.flag == "--prompt-file":
            label = f"--prompt-file {source.value}"
            try:
                with open(source.value, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"{label}: cannot read it as UTF-8 text ({err})") from None
            # Editors end files with a newline that is not meant as part of the prompt.
            text = text[:-1] if text.endswith("\n") else text
        else:
            label, text = f"--prompt #{i}", source.value
        if not text:
            raise UserError(f"{label} is empty: a prompt needs at least one character")
        prompts.append(Prompt(label=label, text=text))
    return prompts


def continue_prompts(checkpoint: str, sources: list[PromptSource], *, max_new_tokens: int = 100,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, num_sequences: int = 1,
                     seed: int = 0, device: str = "cpu", as_json: bool = False) -> None:
    """``gptforge generate``: print the continuations of each prompt (text blocks, or one JSON line each)."""
    from ..data_prep.tokenization.tokenizer import Tokenizer
    from ..training.trained_model import load_trained_model, parse_device

    # Every flag is checked before the (possibly large) checkpoint is read.
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    num_sequences=num_sequences)
    sampling_config(**sampling, stop_token=None)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    prompts = read_prompts(sources)
    torch_device = parse_device(device)

    trained = load_trained_model(checkpoint, device=torch_device)
    print(f"checkpoint {trained.checkpoint} (step {trained.state.get('step')})", file=sys.stderr)
    tokenizer = Tokenizer(trained.tokenizer_path)
    settings = sampling_config(**sampling, stop_token=tokenizer.eod)
    encoded = []
    for prompt in prompts:  # all prompts are checked before any output
        ids = tokenizer.encode(prompt.text)
        try:
            check_prompt(ids, trained.model)
        except ValueError as err:
            raise UserError(f"{prompt.label}: {err}") from None
        encoded.append(ids)

    # One generator for the whole command: the same command and seed print the same text.
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    for number, (prompt, ids) in enumerate(zip(prompts, encoded), start=1):
        result = generate(trained.model, ids, settings, generator=generator)
        print(render(prompt, number, result, tokenizer, as_json=as_json), flush=True)


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
