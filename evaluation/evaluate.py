"""``gptforge eval CHECKPOINT``: validation perplexity and zero-, one-, few-shot tasks (GPT-2/GPT-3 style).

1. Perplexity (``--data PREFIX``): the documents of a ``gptforge tokenize`` output (all of them, or the
   validation part of ``--data-split`` with the training split rule) are packed end to end, with their
   end-of-text tokens, into windows of ``--seq-len`` tokens (GPT-3 Appendix B packs training data the
   same way); every token but the first is predicted once. Reported: mean token loss and its exp.
2. Tasks (``--task FILE``): the JSONL format of ``evaluation/tasks.py`` / ``docs/evaluation.md``, each scored
   with K = each of ``--shots`` demonstrations by GPT-3's rules (GPT-3, Brown et al. 2020,
   section 2.4 "Evaluation"): LAMBADA last-word accuracy (greedy) and perplexity; multiple choice by
   log-likelihood, total, per token and (when the task asks) against ``"Answer: "``.

Results go to ``OUTPUT/eval_results.json`` and stdout, and to MLflow (a sqlite store in OUTPUT unless
``MLFLOW_TRACKING_URI`` is set).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from ..common.errors import UserError
from .tasks import (ChoiceScores, Task, choose, completion_logprobs, fit_prompt, load_task,
                                          perplexity, sample_demonstrations)

RESULTS_FILE = "eval_results.json"


def check_eval_flags(*, data: list[str], tasks: list[str], seq_len: int | None, max_tokens: int | None,
                     limit: int | None, batch_size: int, shots: list[int], data_split: str | None) -> None:
    """Every flag problem before the checkpoint is read."""
    from ..training.data import split_fractions

    errors = []
    if not data and not tasks:
        errors.append("give at least one --data PREFIX or --task FILE")
    for flag, value, low in (("--seq-len", seq_len, 2), ("--max-tokens", max_tokens, 2),
                             ("--limit", limit, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            errors.append(f"{flag} must be >= {low}, got {value}")
    if any(k < 0 for k in shots):
        errors.append(f"--shots must be >= 0, got {shots}")
    if data_split is not None:
        try:
            fractions = split_fractions(data_split)
            if len(fractions) != 3 or min(fractions) < 0 or fractions[1] <= 0:
                raise ValueError
        except (ValueError, ZeroDivisionError):
            errors.append(f"--data-split: expected 'train,valid,test' weights with valid > 0, got {data_split!r}")
    if errors:
        raise UserError("\n".join(errors))


# ---------------------------------------------------------------------------------------------- perplexity


def document_range(n_documents: int, split: str | None) -> tuple[int, int]:
    """Documents [begin, end) scored: all, or the validation part of ``split`` rounded as megatron-core's
    builder cuts documents into splits (``training/data.py check_sources`` uses the same rule)."""
    if split is None:
        return 0, n_documents
    from ..training.data import split_fractions

    bounds = np.cumsum([0.0] + split_fractions(split))
    return int(round(bounds[1] * n_documents)), int(round(bounds[2] * n_documents))


def read_token_stream(prefix: str, tokenizer_sha: str, split: str | None, max_tokens: int | None
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """The documents of ``prefix`` in order, concatenated ([N] int64), and the document range used."""
    from ..training.data import import_megatron_datasets
    from ..data_prep.tokenization.indexed_writer import read_metadata

    try:
        meta = read_metadata(prefix)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--data {prefix}: {err}") from None
    if meta.get("tokenizer", {}).get("sha256") != tokenizer_sha:
        raise UserError(f"--data {prefix}: tokenized with {meta.get('tokenizer', {}).get('path')}, not with the "
                         f"checkpoint's tokenizer; re-run 'gptforge tokenize' with the checkpoint's tokenizer file")
    _, _, indexed_dataset = import_megatron_datasets()
    index = indexed_dataset.IndexedDataset(prefix, mmap=True)
    begin, end = document_range(len(index), split)
    pieces, total = [], 0
    for i in range(begin, end):
        doc = np.asarray(index[i], dtype=np.int64)
        pieces.append(doc)
        total += doc.size
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream.size < 2:
        raise UserError(f"--data {prefix}: documents {begin}..{end} hold {stream.size} token(s); "
                         f"perplexity needs at least 2")
    return stream, (begin, end)


@torch.no_grad()
def stream_loss(model, stream: np.ndarray, seq_len: int, batch_size: int, device: torch.device
                ) -> tuple[float, int]:
    """(sum of token losses, tokens predicted) over non-overlapping windows: window w predicts tokens
    [w*L + 1, w*L + L] from tokens [w*L, w*L + L - 1]; the last window may be shorter."""
    tokens = torch.from_numpy(stream)
    starts = list(range(0, tokens.numel() - 1, seq_len))
    total, count = 0.0, 0
    for first in range(0, len(starts), batch_size):
        group = starts[first : first + batch_size]
        lengths = [min(seq_len, tokens.numel() - 1 - s) for s in group]
        width = max(lengths)
        inputs = torch.zeros(len(group), width, dtype=torch.long)  # [B, T], right-padded
        labels = torch.full((len(group), width), -100, dtype=torch.long)  # [B, T]; -100: padding, no loss
        for row, (s, n) in enumerate(zip(group, lengths)):
            inputs[row, :n] = tokens[s : s + n]
            labels[row, :n] = tokens[s + 1 : s + n + 1]
        logits = model(inputs.to(device)).float()  # [B, T, V]
        # Softmax over every logit column, as the training loss does: comparable with its validation loss.
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(),
                                                         ignore_index=-100, reduction="sum"))
        count += sum(lengths)
    return total, count


# ------------------------------------------------------------------------------------------------- tasks


@torch.no_grad()
def score_completions(model, requests: list[tuple[list[int], list[int]]], *, vocab_size: int, batch_size: int,
                      device: torch.device) -> list[tuple[float, int, bool]]:
    """(prompt tokens, completion tokens) pairs -> (completion log-likelihood, its tokens, greedy match).

    Sequences are right-padded in a batch: a causal model's outputs at real positions do not see the
    padding after them."""
    results = []
    for first in range(0, len(requests), batch_size):
        group = requests[first : first + batch_size]
        seqs = [prompt + completion for prompt, completion in group]
        batch = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(seqs):
            batch[row, : len(seq)] = torch.tensor(seq)
        logits = model(batch.to(device))  # [B, T, V]
        for row, ((prompt, completion), seq) in enumerate(zip(group, seqs)):
            logprobs, greedy = completion_logprobs(logits[row, : len(seq)], batch[row, : len(seq)].to(device),
                                                   len(prompt), vocab_size)
            results.append((float(logprobs.sum()), len(completion), greedy))
    return results


def evaluate_task(model, tokenizer, task: Task, *, shots: int, seed: int, limit: int | None, batch_size: int,
                  device: torch.device) -> dict:
    """One task at K = ``shots``: its metrics plus how many demonstrations the context window allowed."""
    context_length = model.config.context_length
    queries = task.test[:limit] if limit is not None else task.test
    # GPT-2 conditions unconditional text on <|endoftext|>; an empty prompt gets it so token 1 has a context.
    def encode_prompt(text_tokens: list[int]) -> list[int]:
        return text_tokens if text_tokens else [tokenizer.eod]

    requests, kept, dropped, truncated = [], [], 0, 0
    for i, query in enumerate(queries):
        demos = sample_demonstrations(task.train, shots, seed=seed, query_index=i) if shots else []
        fitted = fit_prompt(tokenizer.encode, task, demos, query, context_length=context_length)
        kept.append(fitted.kept)
        dropped += fitted.dropped
        truncated += fitted.truncated
        prompt = encode_prompt(fitted.tokens)
        requests.extend((prompt, tokenizer.encode(choice)) for choice in query.choices)
    scored = score_completions(model, requests, vocab_size=tokenizer.vocab_size, batch_size=batch_size,
                               device=device)
    result = {"examples": len(queries), "shots": shots, "demonstrations_mean": sum(kept) / len(kept),
              "demonstrations_dropped": dropped, "prompts_with_dropped_demonstrations":
                  sum(1 for k in kept if k < shots), "queries_truncated": truncated}
    if task.type == "lambada":
        hits = sum(greedy for _, _, greedy in scored)
        nll, target_tokens = -sum(s for s, _, _ in scored), sum(n for _, n, _ in scored)
        return result | {"accuracy": hits / len(queries), "perplexity": perplexity(nll, target_tokens),
                         "target_tokens": target_tokens}

    unconditional = None
    if task.unconditional_prefix is not None:  # independent of K: scored once per choice
        prefix = encode_prompt(tokenizer.encode(task.unconditional_prefix))
        pairs = [(prefix, tokenizer.encode(c)) for q in queries for c in q.choices]
        unconditional = [s for s, _, _ in score_completions(model, pairs, vocab_size=tokenizer.vocab_size,
                                                            batch_size=batch_size, device=device)]
    correct: dict[str, int] = {}
    offset = 0
    for query in queries:
        n = len(query.choices)
        rows = scored[offset : offset + n]
        prior = None if unconditional is None else unconditional[offset : offset + n]
        picks = choose(ChoiceScores(loglik=[s for s, _, _ in rows], tokens=[t for _, t, _ in rows],
                                    unconditional=prior))
        for rule, pick in picks.items():
            correct[rule] = correct.get(rule, 0) + (pick == query.answer)
        offset += n
    result["accuracy"] = correct["total"] / len(queries)
    result["accuracy_per_token"] = correct["per_token"] / len(queries)
    if "unconditional" in correct:
        result["accuracy_unconditional"] = correct["unconditional"] / len(queries)
    return result


# ----------------------------------------------------------------------------------------------- command


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"ppl/PREFIXNAME/perplexity": ..., "TASK/Kshot/accuracy": ...}`` for MLflow."""
    metrics = {}
    for prefix, row in results["perplexity"].items():
        name = os.path.basename(prefix)
        metrics[f"ppl/{name}/mean_loss"] = row["mean_loss"]
        metrics[f"ppl/{name}/perplexity"] = row["perplexity"]
    for task, by_shots in results["tasks"].items():
        for shots, row in by_shots["shots"].items():
            for key, value in row.items():
                if key != "shots" and isinstance(value, (int, float)):
                    metrics[f"{task}/{shots}shot/{key}"] = float(value)
    return metrics


def log_to_mlflow(results: dict, output: str, experiment: str, results_path: str) -> None:
    from ..common.tracking import Tracker, default_artifact_root, default_tracking_uri

    uri = default_tracking_uri(output, None)
    tracker = Tracker(tracking_uri=uri, experiment=experiment, run_name=f"eval step {results['step']}", run_id=None,
                      artifact_root=default_artifact_root(uri, output))
    tracker.log_params({"checkpoint": results["checkpoint"], "shots": results["settings"]["shots"],
                        "seed": results["settings"]["seed"], "tasks": ",".join(results["tasks"]),
                        "data": ",".join(results["perplexity"])})
    tracker.log_metrics(flat_metrics(results), step=int(results["step"] or 0))
    tracker.log_artifact(results_path)
    tracker.close()
    results["mlflow_run_id"] = tracker.run_id


def evaluate_checkpoint(checkpoint: str, *, data: list[str] = (), tasks: list[str] = (), data_split: str | None = None,
                        seq_len: int | None = None, max_tokens: int | None = None, shots: list[int] = (0, 1),
                        seed: int = 1234, limit: int | None = None, batch_size: int = 8, device: str = "cpu",
                        output: str | None = None, mlflow: bool = True,
                        mlflow_experiment: str = "gptforge-eval") -> dict:
    """``gptforge eval``: the results written to ``OUTPUT/eval_results.json`` (and MLflow unless not ``mlflow``)."""
    from ..common.atomic import atomic_write_json
    from ..data_prep.tokenization.tokenizer import Tokenizer
    from ..training.trained_model import load_trained_model, parse_device

    data, shots = list(data), list(shots)
    check_eval_flags(data=data, tasks=list(tasks), seq_len=seq_len, max_tokens=max_tokens, limit=limit,
                     batch_size=batch_size, shots=shots, data_split=data_split)
    loaded = [load_task(path) for path in tasks]  # file errors before the checkpoint is read
    for task in loaded:
        if max(shots) > len(task.train):
            raise UserError(f"--shots {max(shots)}: {task.path} has only {len(task.train)} training examples")
    device = parse_device(device)
    trained = load_trained_model(checkpoint, device=device)
    print(f"checkpoint {trained.checkpoint} (step {trained.state.get('step')})", file=sys.stderr)
    tokenizer = Tokenizer(trained.tokenizer_path)
    model = trained.model
    seq_len = seq_len or model.config.context_length
    if seq_len > model.config.context_length:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context length {model.config.context_length}")

    results = {"checkpoint": trained.checkpoint, "step": trained.state.get("step"),
               "settings": {"shots": shots, "seed": seed, "limit": limit, "seq_len": seq_len,
                            "data_split": data_split, "max_tokens": max_tokens},
               "perplexity": {}, "tasks": {}}
    for prefix in data:
        stream, (begin, end) = read_token_stream(prefix, tokenizer.sha256, data_split, max_tokens)
        nll, count = stream_loss(model, stream, seq_len, batch_size, device)
        results["perplexity"][prefix] = {"documents": [begin, end], "tokens": count, "mean_loss": nll / count,
                                         "perplexity": perplexity(nll, count)}
    for task in loaded:
        if task.name in results["tasks"]:
            raise UserError(f"--task {task.path}: task name {task.name!r} is used by another --task file")
        by_shots = {str(k): evaluate_task(model, tokenizer, task, shots=k, seed=seed, limit=limit,
                                          batch_size=batch_size, device=device) for k in shots}
        notes = [f"{k}-shot: {row['prompts_with_dropped_demonstrations']} of {row['examples']} prompts dropped "
                 f"{row['demonstrations_dropped']} demonstration(s) to fit the context of {model.config.context_length}"
                 for k, row in by_shots.items() if row["demonstrations_dropped"]]
        results["tasks"][task.name] = {"type": task.type, "file": task.path, "shots": by_shots, "notes": notes}

    output = output or os.path.join(trained.checkpoint, "eval")
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, RESULTS_FILE)
    atomic_write_json(path, results)
    if mlflow:
        log_to_mlflow(results, output, mlflow_experiment, path)
        atomic_write_json(path, results)  # now with the MLflow run id
    return results
