"""Task files and scoring rules of ``gptforge eval`` (zero-, one- and few-shot, as in GPT-3).

Rules from GPT-3 (Brown et al. 2020), section 2.4 "Evaluation" (with Figure 2.1 for the K-shot
format): K demonstrations drawn at random from the task's training split, separated by
newlines, K limited by what fits in the context; multiple choice scored by the log-likelihood of each
completion, per-token normalised, optionally normalised by the completion's likelihood given
``"Answer: "``; LAMBADA scored by last-word accuracy (greedy decoding must reproduce the whole word).

A task file is JSONL (format in ``docs/evaluation.md``): line 1 is a header object
``{"task": NAME, "type": "lambada" | "multiple_choice", "description": ..., "separator": ...,
"unconditional_prefix": ...}``; every other line is one example with ``"split": "train" | "test"``
and the fields of its type (``text``; or ``context``, ``choices``, ``answer``).

Everything here is pure (strings, token lists, tensors): the model runs in ``evaluate.py``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..common.errors import UserError
from ..common.jsonl import strict_json_lines

TASK_TYPES = ("lambada", "multiple_choice")
SPLITS = ("train", "test")
DEFAULT_SEPARATOR = "\n\n"
"""GPT-3 section 2.4: demonstrations are separated by one or two newlines; two keep examples apart."""

_HEADER_KEYS = {"task", "type", "description", "separator", "unconditional_prefix"}
_EXAMPLE_KEYS = {"lambada": {"split", "text"}, "multiple_choice": {"split", "context", "choices", "answer"}}


class TaskFileError(UserError):
    """A problem of a task file, naming the file, the line and the field."""


@dataclass(kw_only=True)
class Example:
    context: str
    """The query text the model conditions on (LAMBADA: the passage without its last word)."""
    choices: list[str]
    """Completions scored after ``context``; LAMBADA has one (the last word with its leading space)."""
    answer: int
    """Index of the correct completion."""
    line: int
    """Line number in the task file (1-based), for messages."""

    def demonstration(self) -> str:
        """The example solved, as shown to the model in a few-shot prompt."""
        return self.context + self.choices[self.answer]


@dataclass(kw_only=True)
class Task:
    name: str
    type: str
    """``lambada`` or ``multiple_choice``."""
    path: str
    description: str = ""
    """Natural-language task description put before the demonstrations (GPT-3 Figure 2.1)."""
    separator: str = DEFAULT_SEPARATOR
    """Between the description, each demonstration and the query."""
    unconditional_prefix: str | None = None
    """Multiple choice: also score each completion given only this text (GPT-3 used ``"Answer: "``)."""
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def _need(obj: dict, key: str, kind: type | tuple, where: str) -> object:
    if key not in obj:
        raise TaskFileError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskFileError(f"{where}: field {key!r} must be a {names}, got {value!r}")
    return value


def split_last_word(text: str, where: str) -> tuple[str, str]:
    """``"... the old man"`` -> (``"... the old"``, ``" man"``): the target keeps its leading space, so
    context + target is the passage exactly (GPT-2 section 3.3 LAMBADA: predict the final word)."""
    stripped = text.rstrip()
    cut = max(stripped.rfind(" "), stripped.rfind("\n"))
    if cut <= 0 or cut == len(stripped) - 1:
        raise TaskFileError(f"{where}: field 'text' needs a context and a last word separated by a space, "
                            f"got {text!r}")
    return stripped[:cut], stripped[cut:]


def _parse_example(obj: dict, task_type: str, path: str, line: int) -> tuple[str, Example]:
    where = f"{path} line {line}"
    unknown = set(obj) - _EXAMPLE_KEYS[task_type]
    if unknown:
        raise TaskFileError(f"{where}: unknown field(s) {sorted(unknown)} for a {task_type} task "
                            f"(known: {sorted(_EXAMPLE_KEYS[task_type])})")
    split = _need(obj, "split", str, where)
    if split not in SPLITS:
        raise TaskFileError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
    if task_type == "lambada":
        context, target = split_last_word(_need(obj, "text", str, where), where)
        return split, Example(context=context, choices=[target], answer=0, line=line)
    context = _need(obj, "context", str, where)
    choices = _need(obj, "choices", list, where)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFileError(f"{where}: field 'choices' must be a list of at least two non-empty strings, "
                            f"got {choices!r}")
    answer = _need(obj, "answer", int, where)
    if not 0 <= answer < len(choices):
        raise TaskFileError(f"{where}: field 'answer' must index 'choices' (0..{len(choices) - 1}), got {answer}")
    return split, Example(context=context, choices=list(choices), answer=answer, line=line)


def load_task(path: str) -> Task:
    """Read and check a task file; every problem names the file, the line and the field."""
    rows = strict_json_lines(path, TaskFileError)
    if not rows:
        raise TaskFileError(f"{path}: empty task file (line 1 must be the header)")
    number, header = rows[0]
    where = f"{path} line {number}"
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise TaskFileError(f"{where} (header): unknown field(s) {sorted(unknown)} (known: {sorted(_HEADER_KEYS)})")
    name = _need(header, "task", str, f"{where} (header)")
    task_type = _need(header, "type", str, f"{where} (header)")
    if task_type not in TASK_TYPES:
        raise TaskFileError(f"{where} (header): field 'type' must be one of {TASK_TYPES}, got {task_type!r}")
    task = Task(name=name, type=task_type, path=path,
                description=header.get("description", ""), separator=header.get("separator", DEFAULT_SEPARATOR),
                unconditional_prefix=header.get("unconditional_prefix"))
    for key in ("description", "separator"):
        if not isinstance(getattr(task, key), str):
            raise TaskFileError(f"{where} (header): field {key!r} must be a string")
    if task.unconditional_prefix is not None:
        if task_type != "multiple_choice" or not isinstance(task.unconditional_prefix, str):
            raise TaskFileError(f"{where} (header): field 'unconditional_prefix' is a string, and only for "
                                f"multiple_choice tasks")
    for number, obj in rows[1:]:
        split, example = _parse_example(obj, task_type, path, number)
        getattr(task, split).append(example)
    if not task.test:
        raise TaskFileError(f"{path}: no examples with \"split\": \"test\"")
    return task


def sample_demonstrations(train: list[Example], k: int, *, seed: int, query_index: int) -> list[Example]:
    """K training examples for test example ``query_index``, without replacement (GPT-3 section 2.4:
    "drawing K examples randomly from that task's training set"). The draw depends only on (seed,
    query index), so a result is reproducible and does not change when other queries are skipped."""
    if k > len(train):
        raise UserError(f"--shots {k}: the task has only {len(train)} training examples")
    rng = random.Random(seed * 1_000_003 + query_index)
    return rng.sample(train, k)


def build_prompt(description: str, demonstrations: list[str], query: str, separator: str) -> str:
    """``description SEP demo_1 SEP ... demo_K SEP query`` (an empty description is left out)."""
    parts = ([description] if description else []) + demonstrations + [query]
    return separator.join(parts)


@dataclass(kw_only=True)
class FittedPrompt:
    tokens: list[int]
    """Token ids of the prompt (description, demonstrations, query context)."""
    kept: int
    """Demonstrations in the prompt."""
    dropped: int
    """Demonstrations left out because the prompt would not fit the context window."""
    truncated: bool
    """The query alone did not fit: its leftmost tokens were cut."""


def fit_prompt(encode: Callable[[str], list[int]], task: Task, demonstrations: list[Example], query: Example,
               *, context_length: int) -> FittedPrompt:
    """The prompt for ``query`` with as many of ``demonstrations`` as fit (the last ones are dropped first),
    leaving room for the longest completion, so every choice is scored after the same prompt (GPT-3
    section 2.4: K is "however many examples can fit in the model's context window")."""
    longest = max(len(encode(choice)) for choice in query.choices)
    budget = context_length - longest
    if budget < 1:
        raise UserError(f"{task.path} line {query.line}: a completion of {longest} tokens does not fit the "
                         f"model's context of {context_length}")
    for kept in range(len(demonstrations), -1, -1):
        text = build_prompt(task.description, [d.demonstration() for d in demonstrations[:kept]], query.context,
                            task.separator)
        tokens = encode(text)
        if len(tokens) <= budget:
            return FittedPrompt(tokens=tokens, kept=kept, dropped=len(demonstrations) - kept, truncated=False)
    return FittedPrompt(tokens=tokens[-budget:], kept=0, dropped=len(demonstrations), truncated=True)


def completion_logprobs(logits: torch.Tensor, tokens: torch.Tensor, start: int, vocab_size: int
                        ) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``tokens[start:]`` given everything before them, and whether greedy decoding
    (argmax at each step) reproduces them all.

    logits [T, V_padded]: row t predicts token t + 1; tokens [T]; columns >= ``vocab_size`` are embedding
    padding and are excluded from the softmax (the model can never emit them)."""
    if not 1 <= start < tokens.shape[0]:
        raise ValueError(f"completion start {start} must be in [1, {tokens.shape[0]})")
    scores = logits[start - 1 : tokens.shape[0] - 1, :vocab_size].float()  # [C, V]
    logprobs = torch.log_softmax(scores, dim=-1)  # [C, V]
    target = tokens[start:]  # [C]
    picked = logprobs.gather(1, target[:, None])[:, 0]  # [C]
    greedy = bool((scores.argmax(dim=-1) == target).all())
    return picked, greedy


@dataclass(kw_only=True)
class ChoiceScores:
    """Scores of one multiple-choice example, one entry per choice."""

    loglik: list[float]
    """Sum of the completion's token log-probabilities given the prompt."""
    tokens: list[int]
    """Completion lengths in tokens."""
    unconditional: list[float] | None = None
    """Sum of log-probabilities given only the unconditional prefix (``"Answer: "``)."""


def choose(scores: ChoiceScores) -> dict[str, int]:
    """The predicted choice under each rule: ``total`` (argmax log-likelihood), ``per_token`` (argmax of the
    mean token log-likelihood, GPT-3's default normalisation) and, when scored, ``unconditional``
    (argmax of log P(completion | context) - log P(completion | "Answer: "), GPT-3 section 2.4)."""
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: values[i])

    picks = {"total": argmax(scores.loglik),
             "per_token": argmax([s / n for s, n in zip(scores.loglik, scores.tokens)])}
    if scores.unconditional is not None:
        picks["unconditional"] = argmax([c - u for c, u in zip(scores.loglik, scores.unconditional)])
    return picks


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean token negative log-likelihood)."""
    return math.exp(total_nll / tokens)
