"""The GPT-3 quality classifier (Appendix A): training on a separable toy task made of real text, the
saved model, the Pareto keep rule's statistics, and keep decisions that do not depend on order."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from helpers.corpus import stdlib_docstrings

from gptforge.data_prep.filters.classifier import REMOVAL_REASON, QualityClassifier, train_quality_classifier
from gptforge.data_prep.readers.web_document import WebDocument

pytestmark = pytest.mark.unit


def junk(text: str, rng: random.Random) -> str:
    """Crawl-like junk: the words shuffled and half of them replaced by tokens of a fixed spam vocabulary.
    (Shuffling alone would keep the bag of words, which hashed unigram features cannot tell apart; tokens
    never seen twice would give the classifier nothing to learn.)"""
    vocabulary = [f"{a}{b}{n}" for a in ("buy", "win", "free", "click", "deal") for b in ("now", "here", "xx")
                  for n in range(20)]
    tokens = [w if rng.random() < 0.5 else rng.choice(vocabulary) for w in text.split()]
    rng.shuffle(tokens)
    return " ".join(tokens)


def write_jsonl(path, texts, extra_lines=()):
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"{path.stem}-{i}", "body": text}) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    docs = stdlib_docstrings()
    rng = random.Random(0)
    positives = write_jsonl(root / "reference.jsonl", docs, extra_lines=['{"id": "no-body"}', "not json"])
    negatives = write_jsonl(root / "crawl.jsonl", [junk(d, rng) for d in docs])
    model_path = str(root / "model" / "quality.npz")
    report = train_quality_classifier([positives], [negatives], model_path, text_field="body", seed=1)
    return positives, negatives, model_path, report, docs


def test_held_out_accuracy_clearly_above_chance(toy_task):
    _, _, model_path, report, docs = toy_task
    n = len(docs)
    assert report["documents"] == {"positive": n, "negative": n}
    assert report["test"]["positive"] + report["test"]["negative"] == pytest.approx(0.1 * 2 * n, abs=1)
    assert report["test"]["positive"] == pytest.approx(report["test"]["negative"], abs=1)  # stratified
    assert report["train"]["positive"] + report["test"]["positive"] == n
    assert report["positive_fraction"] == 0.5
    assert report["held_out_accuracy"] >= 0.9
    assert report["skipped"] == {"missing_field_body": 1, "invalid_json": 1}
    assert os.listdir(os.path.dirname(model_path)) == ["quality.npz"]  # no temporary file left behind


def test_saved_model_scores_reference_text_higher(toy_task):
    _, _, model_path, report, docs = toy_task
    model = QualityClassifier.load(model_path)
    assert model.report["held_out_accuracy"] == report["held_out_accuracy"]
    rng = random.Random(5)
    good, bad = model.score(docs[:50]), model.score([junk(d, rng) for d in docs[:50]])
    assert good.shape == (50,) and np.all((good >= 0) & (good <= 1))
    assert good.mean() > 0.7 > 0.3 > bad.mean()
    assert model.score([]).shape == (0,)


def test_training_options_and_errors(toy_task, tmp_path):
    positives, negatives, _, _, _ = toy_task
    report = train_quality_classifier([positives], [negatives], str(tmp_path / "m.npz"), text_field="body",
                                      test_fraction=0.0, max_documents=30, n_features=2**10)
    assert report["documents"] == {"positive": 30, "negative": 30}
    assert report["held_out_accuracy"] is None and report["test"] == {"positive": 0, "negative": 0}
    assert QualityClassifier.load(str(tmp_path / "m.npz")).n_features == 2**10
    with pytest.raises(ValueError, match="positive_paths: no such file.*nowhere.jsonl"):
        train_quality_classifier([str(tmp_path / "nowhere.jsonl")], [negatives], str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="positive_paths: need at least 2 documents with a non-empty 'text'"):
        train_quality_classifier([positives], [negatives], str(tmp_path / "x.npz"), text_field="text")
    with pytest.raises(ValueError, match="test_fraction"):
        train_quality_classifier([positives], [negatives], str(tmp_path / "x.npz"), test_fraction=1.0)
    with pytest.raises(ValueError, match="model_path: no such file"):
        QualityClassifier.load(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="model_path: .*bad.npz.* is not a gptforge quality classifier"):
        QualityClassifier.load(str(tmp_path / "bad.npz"))


def constant_model(**kwargs) -> QualityClassifier:
    return QualityClassifier(n_features=8, coef=np.zeros(8), intercept=0.0, **kwargs)


@pytest.mark.parametrize("score, paper", [(0.99, 0.91), (0.9, 0.42), (0.5, 0.026)])
def test_keep_probability_is_pareto_tail(score, paper):
    """P(pareto(9) > 1 - score) = (2 - score)^-9 (GPT-3 paper, Appendix A)."""
    model, n = constant_model(), 20_000
    rate = np.mean([model.keep(f"doc-{i}", score) for i in range(n)])
    expected = (2 - score) ** -9
    assert expected == pytest.approx(paper, abs=0.005)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(rate - expected) < 4 * sigma


def test_alpha_changes_the_tail():
    rate = np.mean([constant_model(alpha=3.0).keep(f"doc-{i}", 0.9) for i in range(5000)])
    assert rate == pytest.approx(1.1 ** -3, abs=0.03)  # 0.75, far from alpha 9's 0.42


def test_keep_is_the_same_in_any_order_shard_and_run(toy_task):
    _, _, model_path, _, docs = toy_task
    ids = [f"crawl/{i}" for i in range(600)]
    texts = {doc_id: docs[i % len(docs)] for i, doc_id in enumerate(ids)}

    def run(order, batch, seed=0):
        model = QualityClassifier.load(model_path, seed=seed)
        kept, scores = set(), {}
        for start in range(0, len(order), batch):
            chunk = [WebDocument(id=doc_id, text=texts[doc_id]) for doc_id in order[start:start + batch]]
            for doc, reason in zip(chunk, model.filter_batch(chunk)):
                assert reason in (None, REMOVAL_REASON)
                scores[doc.id] = doc.meta["quality_score"]
                if reason is None:
                    kept.add(doc.id)
        assert model.counts["documents"] == len(order)
        assert model.counts["kept"] + model.counts[REMOVAL_REASON] == len(order)
        return kept, scores

    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    first, scores = run(ids, 64)
    second, scores_again = run(shuffled, 7)
    # Two "shards", each its own process-like instance.
    shard_a, _ = run(shuffled[:250], 100)
    shard_b, _ = run(shuffled[250:], 1)
    assert first == second == shard_a | shard_b
    assert scores == pytest.approx(scores_again)
    assert 0 < len(first) < len(ids)  # the rule really drew: some kept, some not
    other_seed, _ = run(ids, 64, seed=1)
    assert other_seed != first
