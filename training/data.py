"""Training data: megatron-core ``GPTDataset``s over indexed datasets, blended with per-source weights.

The order of samples is a function of the data config alone (sources, weights, split, ``data.seed``
and the sequence length), never of ``train.max_steps``: the train split is read as consecutive
*epochs* of ``epoch_samples`` samples (the tokens of every source's train split over the sequence
length), and epoch ``k`` is megatron-core's mixture built for exactly that many samples with the seed
derived from (``data.seed``, k). megatron-core's own shuffle depends on how many samples are asked
for, so asking for ``max_steps`` worth would give a run extended with more steps another order. Sample
``i`` is therefore the same sequence in every run, on every rank and after every resume or
extension: the data-loader position is just the number of samples consumed.
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
        splits = split_tokens(path, split)
        for split_id, name in ((0, "train"), (1, "validation")):
            if split_id == 1 and not need_valid:
                continue
            if fractions[split_id] <= 0:
                continue
            documents, total, tokens = splits[split_id]
            if tokens < seq_len + 1:
                errors.append(
                    f"{key}: the {name} split of {path!r} gets {documents} of {total} documents = {tokens} tokens, "
                    f"fewer than one sequence ({seq_len + 1}); use more data or change data.split ({split!r})"
                )
    return errors


def split_tokens(path: str, split: str) -> list[tuple[int, int, int]]:
    """(documents, all documents, tokens) of the train, validation and test splits of the indexed
    dataset at ``path``, cut as megatron-core's builder cuts documents into splits."""
    _, _, indexed_dataset = import_megatron_datasets()
    index = indexed_dataset.IndexedDataset(path, mmap=True)  # keep it open: lengths is a view of its mmap
    lengths = index.sequence_lengths
    n = len(lengths)
    bounds = np.cumsum([0.0] + split_fractions(split))
    out = []
    for split_id in range(3):
        beg, end = int(round(bounds[split_id] * n)), int(round(bounds[split_id + 1] * n))
        out.append((end - beg, n, int(lengths[beg:end].sum())))
    del lengths, index
    return out


def epoch_samples(paths: list[str], split: str, seq_len: int) -> int:
    """Samples in one epoch of the training mixture: every source's train tokens over the sequence
    length (a sample reads ``seq_len + 1`` tokens, the last shared with the next sample)."""
    return max(1, sum((split_tokens(path, split)[0][2] - 1) // seq_len for path in paths))


def epoch_seed(seed: int, epoch: int) -> int:
    """megatron-core's shuffle seed for ``epoch`` (numpy seeds are 32-bit); epoch 0 keeps ``seed``."""
    return (seed + epoch * 1_000_003) % 2**32


@dataclass(kw_only=True)
class GPTDatasets:
    train: "EpochSamples"
    valid: object | None


class EpochSamples:
    """The train split as an endless sequence of epochs: sample ``i`` is sample ``i % epoch_samples``
    of epoch ``i // epoch_samples``. Epochs are built when first read (the last two stay open)."""

    def __init__(self, build_epoch, epoch_samples: int) -> None:
        self._build_epoch = build_epoch
        self.epoch_samples = epoch_samples
        self._open: dict[int, object] = {}

    def epoch(self, k: int):
        if k not in self._open:
            while len(self._open) >= 2:
                self._open.pop(min(self._open))
            self._open[k] = self._build_epoch(k)
        return self._open[k]

    def __getitem__(self, i: int) -> dict:
        k, j = divmod(i, self.epoch_samples)
        return self.epoch(k)[j]


def build_gpt_datasets(*, paths: list[str], weights: list[float], split: str, seq_len: int, seed: int,
                       vocab_size: int, eod: int, valid_samples: int, cache_dir: str) -> GPTDatasets:
    """Build (on every rank, deterministically) the train epochs and the validation set of the mixture."""
    os.makedirs(cache_dir, exist_ok=True)
    per_epoch = epoch_samples(paths, split, seq_len)

    def build(epoch: int, train_samples: int, valid: int):
        return _build_split_datasets(paths=paths, weights=weights, split=split, seq_len=seq_len,
                                     seed=epoch_seed(seed, epoch), vocab_size=vocab_size, eod=eod,
                                     train_samples=train_samples, valid_samples=valid, cache_dir=cache_dir)

    # The validation set: its own fixed size, from the data seed (epoch 0's), read from the start.
    valid = build(0, 0, valid_samples)[1] if valid_samples > 0 else None
    train = EpochSamples(lambda epoch: build(epoch, per_epoch, 0)[0], per_epoch)
    return GPTDatasets(train=train, valid=valid)


def _build_split_datasets(*, paths: list[str], weights: list[float], split: str, seq_len: int, seed: int,
                          vocab_size: int, eod: int, train_samples: int, valid_samples: int,
                          cache_dir: str) -> tuple[object | None, object | None]:
    """megatron-core's (train, validation) datasets of the mixture for exactly these sample counts
    (a count of 0 builds no dataset for that split)."""
    builder_mod, gpt_mod, _ = import_megatron_datasets()
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
    matrix = config.split_matrix
    config.split_matrix = [matrix[0] if train_samples else None, matrix[1] if valid_samples else None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, valid, _ = builder_mod.BlendedMegatronDatasetBuilder(
            gpt_mod.GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
        ).build()
    return train, valid


class MockSamples:
    """``data.mock``: sample ``i`` is ``seq_len + 1`` uniform random ids in ``[0, vocab_size)`` drawn from a
    generator seeded by (``seed``, i), as ``{tokens, labels, loss_mask}`` like GPTDataset's; endless."""

    def __init__(self, *, seq_len: int, vocab_size: int, seed: int) -> None:
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) % 2**63)
        ids = torch.randint(self.vocab_size, (self.seq_len + 1,), generator=g)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(self.seq_len)}


def build_mock_datasets(*, seq_len: int, seed: int, vocab_size: int, valid_samples: int) -> GPTDatasets:
    """Synthetic train and validation samples (the validation ones from another seed)."""
    valid = MockSamples(seq_len=seq_len, vocab_size=vocab_size, seed=seed + 1) if valid_samples > 0 else None
    return GPTDatasets(train=MockSamples(seq_len=seq_len, vocab_size=vocab_size, seed=seed), valid=valid)
