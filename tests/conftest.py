"""Shared fixtures: a small real-text corpus (docstrings of the Python standard library, which every
machine with Python has; PSF License), a tokenizer trained on it, its indexed dataset, and a config writer."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers.corpus import base_config, stdlib_docstrings


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(stdlib_docstrings()):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_model(corpus_jsonl, tmp_path_factory) -> str:
    from gptforge.data_prep.tokenization.tokenizer import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([corpus_jsonl], str(prefix), vocab_size=512).model_path


@pytest.fixture(scope="session")
def indexed_prefix(corpus_jsonl, tokenizer_model, tmp_path_factory) -> str:
    from gptforge.data_prep.tokenization.indexed_writer import tokenize_to_indexed

    prefix = str(tmp_path_factory.mktemp("data") / "docs")
    tokenize_to_indexed([corpus_jsonl], prefix, tokenizer_model, progress=False)
    return prefix


@pytest.fixture
def write_config(tmp_path, tokenizer_model, indexed_prefix):
    """write_config(**sections) -> path of a YAML config for the tiny model, sections merged in."""

    def write(name: str = "job.yaml", run_dir=None, **sections) -> str:
        cfg = base_config(run_dir or tmp_path / "run", tokenizer_model, indexed_prefix)
        for section, values in sections.items():
            if values is None:
                cfg.pop(section, None)
            elif isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section] = cfg[section] | values
            else:
                cfg[section] = values
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return write
