"""Config, data and GPT-1 input transformations of ``gptforge finetune``.

GPT-1 (Radford et al. 2018), section 3.3 "Task-specific input transformations" and Figure 1:
every task becomes token sequences of the pretrained model, framed by a start
token ``[s]``, a delimiter ``$`` and an extract token ``[e]`` whose final hidden state feeds the head:

- classification: ``[s] text [e]``
- entailment: ``[s] premise $ hypothesis [e]``
- similarity: ``[s] A $ B [e]`` and ``[s] B $ A [e]`` (final states added element-wise before W_y)
- multiple choice: ``[s] context $ answer_k [e]`` for each k (one score each, softmax over the k)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

from ..common.errors import UserError
from ..common.jsonl import strict_json_lines

TASK_ROLES: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "entailment": ("premise", "hypothesis", "label"),
    "similarity": ("text_a", "text_b", "label"),
    "multiple_choice": ("context", "choices", "label"),
}
"""The data fields each task type reads; ``task.fields`` renames them (role -> field name)."""


@dataclass(kw_only=True)
class FinetuneTaskConfig:
    type: Literal["classification", "entailment", "similarity", "multiple_choice"]
    """Which GPT-1 input transformation (section 3.3) frames the examples."""
    fields: dict = field(default_factory=dict)
    """Role -> field name in the data, for the roles of ``type`` (``TASK_ROLES``); a role left out is read
    from the field of its own name. ``choices`` names one field holding a list, or several comma-separated
    fields (one per answer, e.g. CSV columns ``ending0,ending1,ending2``)."""
    labels: list[str] | None = None
    """Class names in head order (classification, entailment, similarity; required there). A label value
    in the data is one of these names, or an integer index. Multiple choice labels index the choices."""


@dataclass(kw_only=True)
class FinetuneDataConfig:
    train: str
    """Training examples: a ``.jsonl``/``.jsonl.gz`` file, a ``.csv``/``.tsv`` file with a header row, or a
    folder written by ``datasets``' ``save_to_disk``."""
    eval: str
    """Examples whose accuracy is reported (same formats)."""
    train_split: str = "train"
    """Split of a ``datasets`` DatasetDict folder given as ``train``."""
    eval_split: str = "test"
    """Split of a ``datasets`` DatasetDict folder given as ``eval``."""
    max_seq_len: int | None = None
    """Longest sequence after the transformation; default (and at most) the model's context length. Longer
    inputs are cut at the end of their longest text segment and counted in the metrics."""


@dataclass(kw_only=True)
class FinetuneTrainConfig:
    lr: float = 6.25e-5
    """Peak Adam learning rate (GPT-1 section 4.1, fine-tuning details)."""
    batch_size: int = 32
    """Examples per step (GPT-1: 32)."""
    epochs: int = 3
    """Passes over the training examples (GPT-1: 3)."""
    max_steps: int | None = None
    """Stop after this many steps even if the epochs are not done."""
    warmup_fraction: float = 0.002
    """Linear warmup over this fraction of the steps, then linear decay to 0 (GPT-1: 0.2 %)."""
    weight_decay: float = 0.01
    """Decoupled L2 on weight matrices, not on biases or LayerNorm gains (GPT-1 section 4.1, w = 0.01)."""
    aux_lm_weight: float = 0.5
    """lambda in L3 = L2 + lambda * L1 (GPT-1 section 3.2): weight of the language-modelling loss on the
    same inputs; 0 turns the auxiliary objective off (and skips computing it)."""
    classifier_dropout: float = 0.1
    """Dropout on the extract token's hidden state before W_y (GPT-1: 0.1)."""
    seed: int = 1234
    """Seed of the special-token rows, the head init, dropout and the example order."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    log_interval: int = 10
    """Print and track the losses every this many steps."""


@dataclass(kw_only=True)
class FinetuneMlflowConfig:
    enabled: bool = True
    experiment: str = "gptforge-finetune"
    tracking_uri: str | None = None
    """Default: ``MLFLOW_TRACKING_URI`` if set, else a sqlite store in ``output_dir``."""


@dataclass(kw_only=True)
class FinetuneConfig:
    """``configs/finetune/*.yaml``: one fine-tuning job."""

    checkpoint: str
    """The pretrained gptforge checkpoint (step folder, checkpoints/ folder or run folder)."""
    output_dir: str
    """Receives ``model/`` (the fine-tuned model and head), ``metrics.json`` and the MLflow store."""
    task: FinetuneTaskConfig
    data: FinetuneDataConfig
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    mlflow: FinetuneMlflowConfig = field(default_factory=FinetuneMlflowConfig)


def check_config(cfg: FinetuneConfig) -> list[str]:
    """Value errors the types cannot express, each naming its key."""
    errors = []
    roles = TASK_ROLES[cfg.task.type]
    for role, name in cfg.task.fields.items():
        if role not in roles:
            errors.append(f"task.fields.{role}: not a field of a {cfg.task.type} task (roles: {', '.join(roles)})")
        elif not isinstance(name, str) or not name:
            errors.append(f"task.fields.{role}: expected a field name, got {name!r}")
    if cfg.task.type == "multiple_choice":
        if cfg.task.labels is not None:
            errors.append("task.labels: multiple-choice labels index the choices; remove task.labels")
    elif not cfg.task.labels or len(cfg.task.labels) < 2 or not all(isinstance(x, str) for x in cfg.task.labels):
        errors.append(f"task.labels: a {cfg.task.type} task needs a list of at least two class names")
    elif len(set(cfg.task.labels)) != len(cfg.task.labels):
        errors.append(f"task.labels: names must be unique, got {cfg.task.labels}")
    t = cfg.train
    for key, value, low in (("batch_size", t.batch_size, 1), ("epochs", t.epochs, 1),
                            ("max_steps", t.max_steps, 1), ("log_interval", t.log_interval, 1),
                            ("max_seq_len", cfg.data.max_seq_len, 4)):
        if value is not None and value < low:
            section = "data" if key == "max_seq_len" else "train"
            errors.append(f"{section}.{key} must be >= {low}, got {value}")
    for key in ("lr", "weight_decay", "aux_lm_weight"):
        if getattr(t, key) < 0:
            errors.append(f"train.{key} must be >= 0, got {getattr(t, key)}")
    for key in ("warmup_fraction", "classifier_dropout"):
        if not 0 <= getattr(t, key) < 1:
            errors.append(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    for key in ("train", "eval"):
        path = getattr(cfg.data, key)
        if not os.path.exists(path):
            errors.append(f"data.{key}: no such file or folder {path!r}")
    return errors


# ---------------------------------------------------------------------------------------------- reading


@dataclass(kw_only=True)
class TaskExample:
    texts: list[str]
    """The text segments in role order: [text], [premise, hypothesis], [A, B] or [context, answer_1, ...]."""
    label: int
    """Class index (or index of the correct answer)."""


def read_records(path: str, split: str) -> list[tuple[str, dict]]:
    """(where, record) pairs; ``where`` names the file and line (row) for error messages."""
    if os.path.isdir(path):
        import datasets

        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
        return [(f"{path} [{split}] row {i}", dict(row)) for i, row in enumerate(loaded)]
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if lower.endswith(".tsv") else ",")
            # Line 1 is the header, so data row i is line i + 1.
            return [(f"{path} line {i}", row) for i, row in enumerate(reader, start=2)]
    if lower.endswith((".jsonl", ".jsonl.gz", ".json")):
        return [(f"{path} line {number}", obj) for number, obj in strict_json_lines(path)]
    raise UserError(f"{path}: unknown data format (expected .jsonl, .jsonl.gz, .csv, .tsv or a datasets folder)")


def _label(value, where: str, name: str, labels: list[str] | None, n_choices: int | None) -> int:
    count = n_choices if labels is None else len(labels)
    if labels is not None and isinstance(value, str) and value in labels:
        return labels.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # CSV cells are strings
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    known = f"one of {labels} or an index 0..{count - 1}" if labels is not None else f"an index 0..{count - 1}"
    raise UserError(f"{where}: field {name!r} must be {known}, got {value!r}")


def parse_example(record: dict, where: str, task: FinetuneTaskConfig) -> TaskExample:
    """One record -> texts in role order and a label; a missing or bad field is named with file and line."""
    def get(role: str):
        name = task.fields.get(role, role)
        if name not in record or record[name] is None:
            raise UserError(f"{where}: missing field {name!r} ({role} of a {task.type} task)")
        return record[name]

    def text(role: str) -> str:
        value = get(role)
        if not isinstance(value, str):
            raise UserError(f"{where}: field {task.fields.get(role, role)!r} must be a string, got {value!r}")
        return value

    roles = TASK_ROLES[task.type]
    if task.type != "multiple_choice":
        texts = [text(role) for role in roles[:-1]]
        return TaskExample(texts=texts, label=_label(get("label"), where, task.fields.get("label", "label"),
                                                     task.labels, None))
    context = text("context")
    spec = task.fields.get("choices", "choices")
    if "," in spec:
        columns = [c.strip() for c in spec.split(",")]
        choices = []
        for column in columns:
            if column not in record or not isinstance(record[column], str):
                raise UserError(f"{where}: missing field {column!r} (an answer of task.fields.choices)")
            choices.append(record[column])
    else:
        choices = get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: field {spec!r} must be a list of at least two strings, got {choices!r}")
    label = _label(get("label"), where, task.fields.get("label", "label"), None, len(choices))
    return TaskExample(texts=[context, *choices], label=label)


def load_examples(path: str, split: str, task: FinetuneTaskConfig) -> list[TaskExample]:
    examples = [parse_example(record, where, task) for where, record in read_records(path, split)]
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


# ------------------------------------------------------------------------------------ transformations


@dataclass(kw_only=True, frozen=True)
class SpecialTokens:
    """Ids of the three tokens GPT-1 adds for fine-tuning: rows appended after the pretrained vocabulary."""

    start: int
    delimiter: int
    extract: int


def _fit(segments: list[list[int]], room: int) -> tuple[list[list[int]], bool]:
    """Cut the end of the longest segment, one token at a time, until the segments total ``room`` tokens."""
    segments = [list(s) for s in segments]
    cut = False
    while sum(len(s) for s in segments) > room:
        longest = max(range(len(segments)), key=lambda i: len(segments[i]))
        segments[longest].pop()
        cut = True
    return segments, cut


def transform(task_type: str, texts: list[list[int]], special: SpecialTokens, max_len: int
              ) -> tuple[list[list[int]], bool]:
    """Encoded text segments -> the GPT-1 input sequences of one example, and whether any was cut to
    ``max_len``. One sequence for classification and entailment, two for similarity, one per answer
    for multiple choice."""
    s, d, e = special.start, special.delimiter, special.extract
    if task_type == "classification":
        (text,), cut = _fit(texts, max_len - 2)
        return [[s, *text, e]], cut
    if task_type in ("entailment", "similarity"):
        (a, b), cut = _fit(texts, max_len - 3)
        if task_type == "entailment":
            return [[s, *a, d, *b, e]], cut
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]], cut
    if task_type == "multiple_choice":
        sequences, any_cut = [], False
        for choice in texts[1:]:
            (context, answer), cut = _fit([texts[0], choice], max_len - 3)
            sequences.append([s, *context, d, *answer, e])
            any_cut |= cut
        return sequences, any_cut
    raise UserError(f"task.type: unknown task type {task_type!r}")


@dataclass(kw_only=True)
class EncodedExample:
    sequences: list[list[int]]
    label: int


def encode_examples(examples: list[TaskExample], task_type: str, encode: Callable[[str], list[int]],
                    special: SpecialTokens, max_len: int) -> tuple[list[EncodedExample], int]:
    """Tokenise and transform every example; returns them and how many were cut to fit."""
    encoded, cut = [], 0
    for example in examples:
        sequences, was_cut = transform(task_type, [encode(t) for t in example.texts], special, max_len)
        encoded.append(EncodedExample(sequences=sequences, label=example.label))
        cut += was_cut
    return encoded, cut
