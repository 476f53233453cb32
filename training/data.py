"""Training data: megatron-core ``GPTDataset``s over indexed datasets, blended with per-source weights.

The order of samples is fixed by ``data.seed`` alone, so sample ``i`` of the train split is the same
sequence in every run, on every rank and after every resume: the data-loader position is just the
number of samples consumed.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np


def import_megatron_datasets():
    """megatron-core's data modules, without its warnings about GPU-only packages we do not use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_megatron_dataset_builder, gpt_dataset, indexed_dataset
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    return blended_megatron_dataset_builder, gpt_dataset, indexed_dataset


class MegatronTokenizerInfo:
    """The tokenizer facts GPTDataset needs (end-of-document id, vocabulary size), nothing more."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod

    @property
    def unique_identifiers(self) -> dict:
        return {"vocab_size": self.vocab_size, "eod": self.eod}


def split_fractions(split: str) -> list[float]:
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    while len(parts) < 3:
        parts.append(0.0)
    total = sum(parts)
    return [p / total for p in parts]


def check_sources(paths: list[str], split: str, seq_len: int, tokenizer_sha: str, vocab_size: int,
                  need_valid: bool) -> list[str]:
    """Errors for sources that are missing, incomplete, from another tokenizer, or whose train or
    validation split would hold fewer than ``seq_len + 1`` tokens (megatron-core would spin forever
    building a split with no tokens)."""
    from ..data_prep.tokenization.indexed_writer import read_metadata

    _, _, indexed_dataset = import_megatron_datasets()
    errors = []
    try:
        fractions = split_fractions(split)
        if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        return [f"data.split: expected three non-negative weights 'train,valid,test' with train > 0, got {split!r}"]
    if need_valid and fractions[1] <= 0:
        errors.append(f"data.split {split!r} gives validation no documents but train.eval_interval > 0; "
                      f"give the validation split a share or set train.eval_interval=0")
    bounds = np.cumsum([0.0] + fractions)
    for i, path in enumerate(paths):
        key = f"data.sources[{i}].path"
        try:
            meta = read_metadata(path)
        except (FileNotFoundError, ValueError) as err:
            errors.append(f"{key}: {err}")
            continue
        tok = meta.get("tokenizer", {})
        if tok.get("sha256") != tokenizer_sha or tok.get("vocab_size") != vocab_size:
            errors.append(
                f"{key}: {path!r} was tokenized with another tokenizer ({tok.get('path')}, vocab "
                f"{tok.get('vocab_size')}) than tokenizer.path (vocab {vocab_size}); re-run 'gptforge tokenize' "
                f"with this tokenizer or point tokenizer.path at that one"
            )
            continue
        index = indexed_dataset.IndexedDataset(path, mmap=True)
        lengths = index.sequence_lengths
        n = len(lengths)
        for split_id, name in ((0, "train"), (1, "validation")):
            if split_id == 1 and not need_valid:
                continue
            if fractions[split_id] <= 0:
                continue
            # Same rounding as megatron-core's builder when it cuts documents into splits.
            beg, end = int(round(bounds[split_id] * n)), int(round(bounds[split_id + 1] * n))
            tokens = int(lengths[beg:end].sum())
            if tokens < seq_len + 1:
                errors.append(
                    f"{key}: the {name} split of {path!r} gets {end - beg} of {n} documents = {tokens} tokens, "
                    f"fewer than one sequence ({seq_len + 1}); use more data or change data.split ({split!r})"
                )
    return errors


@dataclass(kw_only=True)
class GPTDatasets:
    train: object
    valid: object | None


def build_gpt_datasets(*, paths: list[str], weights: list[float], split: str, seq_len: int, seed: int,
                       vocab_size: int, eod: int, train_samples: int, valid_samples: int,
                       cache_dir: str) -> GPTDatasets:
    """Build (on every rank, deterministically) the train and validation datasets of the mixture."""
    builder_mod, gpt_mod, _ = import_megatron_datasets()
    os.makedirs(cache_dir, exist_ok=True)
    config = gpt_mod.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        # One source needs no blending layer (and megatron-core warns when asked to build one).
        blend=(list(paths), list(weights) if len(paths) > 1 else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=MegatronTokenizerInfo(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    # The test split stays held out (for evaluation); training never builds it.
    config.split_matrix = [config.split_matrix[0], config.split_matrix[1], None]
    if valid_samples == 0:
        config.split_matrix[1] = None
    sizes = [train_samples, valid_samples, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, valid, _ = builder_mod.BlendedMegatronDatasetBuilder(
            gpt_mod.GPTDataset, sizes, lambda: True, config
        ).build()
    return GPTDatasets(train=train, valid=valid)
