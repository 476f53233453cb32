"""``gptforge finetune --config configs/finetune/*.yaml``: supervised fine-tuning as in GPT-1.

GPT-1 (Radford et al. 2018), section 3.2 "Supervised fine-tuning" (equations 3-5) and section 4.1
(Fine-tuning details): a linear head W_y on the final hidden state of the last (extract) token; objective
L3 = L2 + lambda * L1 with L2 the task cross-entropy and L1 the language-modelling loss on the same
inputs, lambda = 0.5 (``train.aux_lm_weight``; 0 turns it off). Input transformations:
``finetune/data.py``.

Special tokens: ``[s]``, ``$`` and ``[e]`` get ids V, V+1, V+2 (V = the pretrained vocabulary size): the
embedding gets new rows after the pretrained ones, drawn by the model's own rule for token embeddings
(N(0, init_std), GPT-1 section 4.1) from ``train.seed``. Appending, rather than reusing ids of the
pretrained vocabulary, keeps every pretrained token's meaning; the tied output projection then also
predicts them, which the auxiliary LM loss uses. The ``GPT`` module is unchanged: the classifier is a
wrapper around it.

Output: ``OUTPUT/model/`` is a gptforge checkpoint of the extended model (``load_trained_model`` reads
it; ``gptforge eval``/``generate`` work on it) plus ``classifier.pt`` (W_y) and ``finetune.json`` (task,
labels, special ids), written under a temporary name and renamed into place; ``OUTPUT/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import (EncodedExample, FinetuneConfig, SpecialTokens, check_config,
                                             encode_examples, load_examples)
from ..model.gpt import GPT, init_tensor_

CLASSIFIER_FILE = "classifier.pt"
FINETUNE_FILE = "finetune.json"


class GPTClassifier(nn.Module):
    """The pretrained GPT plus W_y on the extract token's final hidden state (GPT-1 section 3.2)."""

    def __init__(self, gpt: GPT, task_type: str, num_outputs: int, classifier_dropout: float) -> None:
        super().__init__()
        self.gpt = gpt
        self.task_type = task_type
        self.dropout = nn.Dropout(classifier_dropout)
        self.head = nn.Linear(gpt.config.d_model, num_outputs)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, with_lm: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, N, T] (N sequences per example, right-padded), lengths [B, N] (0: no such sequence)
        -> task scores [B, C] (multiple choice: [B, N], absent answers -inf) and, with ``with_lm``, the
        LM logits [B*N, T, V] of the same inputs."""
        bsz, n_seq, seq = tokens.shape
        flat = tokens.reshape(bsz * n_seq, seq)  # [B*N, T]
        hidden = self.gpt.hidden_states(flat)  # [B*N, T, D]
        last = (lengths.reshape(-1) - 1).clamp(min=0)  # [B*N], position of the extract token
        extract = hidden[torch.arange(bsz * n_seq, device=tokens.device), last]  # [B*N, D]
        extract = self.dropout(extract).reshape(bsz, n_seq, -1)  # [B, N, D]
        if self.task_type == "multiple_choice":
            scores = self.head(extract)[..., 0]  # [B, N]: one score per answer, softmax over them
            scores = scores.masked_fill(lengths == 0, float("-inf"))
        elif self.task_type == "similarity":
            scores = self.head(extract.sum(dim=1))  # both orders added element-wise: [B, D] -> [B, C]
        else:
            scores = self.head(extract[:, 0])  # [B, C]
        # The tied output projection on the hidden states already computed: one transformer pass serves
        # both losses (calling the GPT again for logits would double the work).
        lm_logits = self.gpt.lm_head(hidden, self.gpt.tok_embeddings.weight) if with_lm else None  # [B*N, T, V]
        return scores, lm_logits


def extend_vocabulary(gpt: GPT, seed: int) -> tuple[GPT, SpecialTokens]:
    """A copy of ``gpt`` whose vocabulary has three more tokens (start, delimiter, extract) after the
    pretrained ones; pretrained rows are kept, rows from the first new id on are drawn by the embedding's
    init rule (the padding rows after them too: they are never targets)."""
    old = gpt.config
    config = dataclasses.replace(old, vocab_size=old.vocab_size + 3)
    device = gpt.tok_embeddings.weight.device
    with torch.device(device):
        model = GPT(config)
    weights = {k: v.clone() for k, v in gpt.state_dict().items()}
    rows = torch.empty(config.padded_vocab_size, config.d_model, device=device)  # [V_padded_new, D]
    init_tensor_(rows, model.init_rule("tok_embeddings.weight"), seed, "tok_embeddings.weight:finetune")
    rows[: old.vocab_size] = weights["tok_embeddings.weight"][: old.vocab_size]
    weights["tok_embeddings.weight"] = rows
    model.load_state_dict(weights)
    v = old.vocab_size
    return model, SpecialTokens(start=v, delimiter=v + 1, extract=v + 2)


def collate(batch: list[EncodedExample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> tokens [B, N, T] (padding id 0, never scored), lengths [B, N], labels [B]."""
    n_seq = max(len(ex.sequences) for ex in batch)
    seq = max(len(s) for ex in batch for s in ex.sequences)
    tokens = torch.zeros(len(batch), n_seq, seq, dtype=torch.long)  # [B, N, T]
    lengths = torch.zeros(len(batch), n_seq, dtype=torch.long)  # [B, N]
    for i, ex in enumerate(batch):
        for j, s in enumerate(ex.sequences):
            tokens[i, j, : len(s)] = torch.tensor(s)
            lengths[i, j] = len(s)
    labels = torch.tensor([ex.label for ex in batch])  # [B]
    return tokens.to(device), lengths.to(device), labels.to(device)


def lm_loss(lm_logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the real tokens: L1 of GPT-1 section 3.2 on the transformed inputs.
    lm_logits [B*N, T, V], tokens [B, N, T], lengths [B, N]."""
    flat = tokens.reshape(-1, tokens.shape[-1])  # [B*N, T]
    positions = torch.arange(flat.shape[1] - 1, device=flat.device)  # [T-1]
    mask = positions[None, :] < (lengths.reshape(-1, 1) - 1)  # [B*N, T-1]: position t predicts t+1 < length
    losses = F.cross_entropy(lm_logits[:, :-1].float().flatten(0, 1), flat[:, 1:].flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def accuracy(model: GPTClassifier, examples: list[EncodedExample], batch_size: int, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for first in range(0, len(examples), batch_size):
        tokens, lengths, labels = collate(examples[first : first + batch_size], device)
        scores, _ = model(tokens, lengths, with_lm=False)
        correct += int((scores.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return correct / len(examples)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total`` (GPT-1 section 4.1)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


@dataclass(kw_only=True)
class FinetunedModel:
    classifier: GPTClassifier
    special: SpecialTokens
    task_type: str
    labels: list[str] | None
    tokenizer_path: str


def load_finetuned(path: str, device: str | torch.device = "cpu") -> FinetunedModel:
    """Read ``OUTPUT/model`` back: the extended GPT and W_y, in eval mode."""
    from ..training.trained_model import load_trained_model

    trained = load_trained_model(path, device=device)
    with open(os.path.join(trained.checkpoint, FINETUNE_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    head = torch.load(os.path.join(trained.checkpoint, CLASSIFIER_FILE), map_location=device)
    classifier = GPTClassifier(trained.model, meta["task_type"], head["weight"].shape[0], 0.0).to(device)
    classifier.head.load_state_dict(head)
    classifier.eval()
    return FinetunedModel(classifier=classifier, special=SpecialTokens(**meta["special_tokens"]),
                          task_type=meta["task_type"], labels=meta["labels"], tokenizer_path=trained.tokenizer_path)


def resolve_config(path: str, overrides: list[str]) -> FinetuneConfig:
    """YAML + ``key.sub=value`` overrides -> a checked config; every problem in one ``ConfigError``."""
    from ..common.config import load_config

    return load_config(FinetuneConfig, path, overrides,
                       check=lambda cfg, errors: errors.extend([] if errors else check_config(cfg)))


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, evaluate accuracy after each epoch, save the model; returns the metrics."""
    from ..common.atomic import atomic_write_json
    from ..data_prep.tokenization.tokenizer import Tokenizer
    from ..training.checkpoint import write_model_checkpoint
    from ..training.trained_model import load_trained_model, parse_device

    device = parse_device(cfg.train.device)
    task, t = cfg.task, cfg.train
    os.makedirs(cfg.output_dir, exist_ok=True)
    train_raw = load_examples(cfg.data.train, cfg.data.train_split, task)  # data errors before the model
    eval_raw = load_examples(cfg.data.eval, cfg.data.eval_split, task)
    trained = load_trained_model(cfg.checkpoint, device=device)
    context = trained.config.context_length
    max_len = min(cfg.data.max_seq_len or context, context)
    tokenizer = Tokenizer(trained.tokenizer_path)
    torch.manual_seed(t.seed)
    gpt, special = extend_vocabulary(trained.model, t.seed)
    train_set, train_cut = encode_examples(train_raw, task.type, tokenizer.encode, special, max_len)
    eval_set, eval_cut = encode_examples(eval_raw, task.type, tokenizer.encode, special, max_len)
    num_outputs = 1 if task.type == "multiple_choice" else len(task.labels)
    model = GPTClassifier(gpt, task.type, num_outputs, t.classifier_dropout).to(device)
    model.train()

    steps_per_epoch = math.ceil(len(train_set) / t.batch_size)
    total = steps_per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.epochs)
    warmup = max(1, round(t.warmup_fraction * total))
    # GPT-1's L2 applies to "non bias or gain weights": matrices (and embeddings), not vectors.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    tracker = None
    if cfg.mlflow.enabled:
        from ..common.tracking import Tracker, default_artifact_root, default_tracking_uri

        uri = default_tracking_uri(cfg.output_dir, cfg.mlflow.tracking_uri)
        tracker = Tracker(tracking_uri=uri, experiment=cfg.mlflow.experiment, run_name=f"finetune {task.type}",
                          run_id=None, artifact_root=default_artifact_root(uri, cfg.output_dir))
        tracker.log_params({"checkpoint": trained.checkpoint, "task": task.type, **{
            f"train.{k}": v for k, v in dataclasses.asdict(t).items()}})
    order_rng = torch.Generator().manual_seed(t.seed)
    history, step, start = [], 0, time.time()
    last = {}
    for epoch in range(t.epochs):
        order = torch.randperm(len(train_set), generator=order_rng).tolist()
        for first in range(0, len(order), t.batch_size):
            if step >= total:
                break
            tokens, lengths, labels = collate([train_set[i] for i in order[first : first + t.batch_size]], device)
            lr = lr_at(step, total, warmup, t.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scores, lm_logits = model(tokens, lengths, with_lm=t.aux_lm_weight > 0)
            task_loss = F.cross_entropy(scores.float(), labels)  # L2
            aux = lm_loss(lm_logits, tokens, lengths) if lm_logits is not None else None  # L1
            loss = task_loss + t.aux_lm_weight * aux if aux is not None else task_loss  # L3
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last = {"loss": float(loss.detach()), "task_loss": float(task_loss.detach()), "lr": lr}
            if aux is not None:
                last["lm_loss"] = float(aux)
            if step % t.log_interval == 0 or step == total:
                print(f"step {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in last.items()), flush=True)
                if tracker:
                    tracker.log_metrics(last, step=step)
        acc = accuracy(model, eval_set, t.batch_size, device)
        history.append({"epoch": epoch + 1, "step": step, "eval_accuracy": acc})
        print(f"epoch {epoch + 1}: eval accuracy {acc:.4f} ({len(eval_set)} examples)", flush=True)
        if tracker:
            tracker.log_metrics({"eval_accuracy": acc}, step=step)
        if step >= total:
            break

    model_dir = os.path.join(cfg.output_dir, "model")
    meta = {"task_type": task.type, "labels": task.labels, "special_tokens": dataclasses.asdict(special),
            "max_seq_len": max_len}
    write_model_checkpoint(model_dir, model.gpt, trained.tokenizer_path,
                           {"step": step, "finetune": meta, "pretrained_checkpoint": trained.checkpoint},
                           extra={FINETUNE_FILE: meta, CLASSIFIER_FILE: model.head.state_dict()})
    metrics = {"task_type": task.type, "steps": step, "epochs_run": len(history), "seconds": time.time() - start,
               "eval_accuracy": history[-1]["eval_accuracy"], "chance_accuracy": chance(eval_set),
               "history": history, "final": last, "aux_lm_weight": t.aux_lm_weight,
               "examples": {"train": len(train_set), "eval": len(eval_set), "train_truncated": train_cut,
                            "eval_truncated": eval_cut},
               "special_tokens": dataclasses.asdict(special), "model_dir": model_dir}
    atomic_write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    if tracker:
        tracker.log_artifact(os.path.join(cfg.output_dir, "metrics.json"))
        tracker.close()
    return metrics


def chance(examples: list[EncodedExample]) -> float:
    """Accuracy of always answering the most frequent label: the bar fine-tuning has to clear."""
    counts: dict[int, int] = {}
    for ex in examples:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    return max(counts.values()) / len(examples)
