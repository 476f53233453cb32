"""The order of training samples depends on the data config only: extending a run keeps it."""

import json

import pytest

from helpers.corpus import base_config, stdlib_docstrings
from helpers.launch import losses, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_corpus(tokenizer_model, tmp_path_factory) -> tuple[str, int]:
    """An indexed dataset of about 2,400 tokens (its train split: under 160 samples of 32 tokens), and its
    epoch length in samples."""
    from gptforge.data_prep.tokenization.indexed_writer import tokenize_to_indexed
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer
    from gptforge.training.data import epoch_samples

    tok = Tokenizer(tokenizer_model)
    folder = tmp_path_factory.mktemp("small")
    jsonl = folder / "docs.jsonl"
    total = 0
    with open(jsonl, "w", encoding="utf-8") as handle:
        for i, text in enumerate(stdlib_docstrings()):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
            total += len(tok.encode(text)) + 1
            if total > 2400:
                break
    prefix = str(folder / "docs")
    tokenize_to_indexed([str(jsonl)], prefix, tokenizer_model, progress=False)
    return prefix, epoch_samples([prefix], "90,10,0", 32)


def test_extended_run_reads_the_same_samples_as_a_straight_run(small_corpus, tokenizer_model, tmp_path):
    """10 steps, then --resume auto with max_steps=40, equals a straight 40-step run at every step,
    across an epoch boundary (40 steps read 160 samples, more than one epoch; 10 steps read 40, less)."""
    import yaml

    prefix, per_epoch = small_corpus
    assert 40 < per_epoch < 160, per_epoch

    def config(name: str, max_steps: int) -> str:
        cfg = base_config(tmp_path / name, tokenizer_model, prefix)
        cfg["train"] |= {"max_steps": max_steps, "eval_interval": 0}
        cfg["checkpoint"] = {"interval": 10, "keep_last": 2}
        path = tmp_path / f"{name}-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    proc = run_train(config("straight", 40))
    assert proc.returncode == 0, proc.stderr
    proc = run_train(config("extended", 10))
    assert proc.returncode == 0, proc.stderr
    proc = run_train(config("extended", 40), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_00000010" in proc.stdout
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "extended")
    assert sorted(got) == list(range(1, 41))
    assert got == want  # exact: the same samples in the same order, fp32 on CPU


def test_sample_i_does_not_depend_on_how_far_a_run_goes(small_corpus, tokenizer_model, tmp_path):
    """The datasets built for a run read sample i identically however many samples are read, and
    epoch k + 1 is a new shuffle of the same documents."""
    from collections import Counter

    import numpy as np

    from gptforge.data_prep.tokenization.tokenizer import Tokenizer
    from gptforge.training.data import build_gpt_datasets

    prefix, per_epoch = small_corpus
    tok = Tokenizer(tokenizer_model)

    def build(cache: str):
        return build_gpt_datasets(paths=[prefix], weights=[1.0], split="90,10,0", seq_len=32, seed=7,
                                  vocab_size=tok.vocab_size, eod=tok.eod, valid_samples=0,
                                  cache_dir=str(tmp_path / cache))

    a, b = build("a"), build("b")
    # b reads far ahead first (epoch 2), then the same positions as a
    tail = [b.train[i]["tokens"] for i in range(3 * per_epoch - 5, 3 * per_epoch)]
    for i in range(2 * per_epoch + 3):
        assert np.array_equal(a.train[i]["tokens"], b.train[i]["tokens"]), i
    assert all(np.array_equal(x, a.train[3 * per_epoch - 5 + j]["tokens"]) for j, x in enumerate(tail))
    # Epoch 1 reads the same documents as epoch 0 (each sample's first 32 tokens cover the train split
    # once, but for the last partial sample), shuffled anew, so the samples are cut differently.
    def epoch_tokens(k: int) -> Counter:
        return Counter(t for i in range(per_epoch) for t in a.train[k * per_epoch + i]["tokens"][:32].tolist())

    first, second = epoch_tokens(0), epoch_tokens(1)
    assert sum(((first - second) + (second - first)).values()) <= 2 * 32
    assert [a.train[i]["tokens"].tolist() for i in range(per_epoch)] != \
        [a.train[per_epoch + i]["tokens"].tolist() for i in range(per_epoch)]
