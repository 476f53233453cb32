"""The GPT-3 quality classifier (Brown et al. 2020, Appendix A).

GPT-3 trained a logistic regression on Spark's Tokenizer + HashingTF features with a high-quality
reference corpus (WebText, Wikipedia, web books) as positives and unfiltered Common Crawl as negatives,
then kept a crawl document iff ``np.random.pareto(alpha) > 1 - document_score`` with alpha = 9, so that
P(keep) = (2 - score)^-9: about 0.91 at score 0.99, 0.42 at 0.9, 0.026 at 0.5. Mostly high-scoring
documents survive, and some low-scoring ones too, which keeps the corpus diverse.

Here the features are scikit-learn's ``HashingVectorizer`` configured like Spark's pair (lowercase,
whitespace tokens, raw term counts hashed into ``n_features`` buckets, then L2-normalised for the
solver). The vectorizer is stateless, so a model file holds only its parameters and the regression
weights (an ``.npz`` written atomically; no pickle). The Pareto draw for a document comes from a
generator seeded by ``(seed, document id)``, so reruns, any sharding and any order keep the same
documents.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import xxhash

from ...common.errors import UserError
from ...common.atomic import atomic_write_bytes
from ..readers.documents import SkipLog, check_input_files, iter_records

REMOVAL_REASON = "quality_classifier"
PARETO_ALPHA = 9.0
"""GPT-3 Appendix A: alpha = 9."""
MODEL_FORMAT = "gptforge-quality-classifier-v1"


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    # Spark's Tokenizer lowercases and splits on whitespace; HashingTF counts terms (no sign trick).
    return HashingVectorizer(n_features=n_features, lowercase=True, token_pattern=None, tokenizer=str.split,
                             alternate_sign=False, norm="l2")


def _read_texts(paths: list[str], text_field: str, limit: int | None, skips: SkipLog) -> list[str]:
    texts: list[str] = []
    for path in paths:
        for record, where in iter_records(path, text_field, skips):
            if limit is not None and len(texts) >= limit:
                return texts
            if not record[text_field].strip():
                skips.add(f"empty_{text_field}", where)
                continue
            texts.append(record[text_field])
    return texts


def train_quality_classifier(positive_paths: list[str], negative_paths: list[str], output_path: str, *,
                             text_field: str = "text", test_fraction: float = 0.1, seed: int = 0,
                             n_features: int = 2**18, max_documents: int | None = None) -> dict:
    """Fit the classifier (positives: a reference corpus; negatives: raw crawl), measure it on a held-out
    ``test_fraction`` (stratified, seeded), save it to ``output_path`` atomically and return a report:
    ``documents`` / ``train`` / ``test`` class counts, ``positive_fraction``, ``held_out_accuracy``
    (None when ``test_fraction`` is 0), ``skipped`` records and the ``output_path``.

    ``max_documents`` caps each class (the first ones read), so a huge crawl need not be read whole.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    errors = check_input_files(list(positive_paths), "positive_paths") + \
        check_input_files(list(negative_paths), "negative_paths")
    if not 0.0 <= test_fraction < 1.0:
        errors.append(f"test_fraction: must be in [0, 1), got {test_fraction}")
    if n_features < 2:
        errors.append(f"n_features: must be at least 2, got {n_features}")
    if max_documents is not None and max_documents < 1:
        errors.append(f"max_documents: must be positive, got {max_documents}")
    if errors:
        raise UserError("; ".join(errors))
    skips = SkipLog()
    positives = _read_texts(list(positive_paths), text_field, max_documents, skips)
    negatives = _read_texts(list(negative_paths), text_field, max_documents, skips)
    for name, texts in (("positive_paths", positives), ("negative_paths", negatives)):
        if len(texts) < 2:
            raise UserError(f"{name}: need at least 2 documents with a non-empty {text_field!r} field, "
                             f"read {len(texts)} ({skips.summary()})")
    texts = positives + negatives
    labels = np.array([1] * len(positives) + [0] * len(negatives), dtype=np.int8)
    if test_fraction > 0:
        train_x, test_x, train_y, test_y = train_test_split(
            texts, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    else:
        train_x, test_x, train_y, test_y = texts, [], labels, labels[:0]
    vectorizer = _vectorizer(n_features)
    model = LogisticRegression(max_iter=1000, random_state=seed)
    model.fit(vectorizer.transform(train_x), train_y)
    classifier = QualityClassifier(n_features=n_features, coef=model.coef_[0], intercept=float(model.intercept_[0]))
    accuracy = None
    if len(test_y):
        accuracy = float(np.mean((classifier.score(test_x) > 0.5) == (test_y == 1)))
    report = {
        "documents": {"positive": len(positives), "negative": len(negatives)},
        "train": {"positive": int(train_y.sum()), "negative": int(len(train_y) - train_y.sum())},
        "test": {"positive": int(test_y.sum()), "negative": int(len(test_y) - test_y.sum())},
        "positive_fraction": len(positives) / len(texts),
        "held_out_accuracy": accuracy,
        "n_features": n_features,
        "seed": seed,
        "skipped": dict(skips.counts),
        "skipped_summary": skips.summary(),
        "output_path": output_path,
    }
    classifier.save(output_path, report=report)
    return report


class QualityClassifier:
    """A trained classifier: ``score`` texts, ``keep`` by the Pareto rule, or filter documents
    (``__call__`` / ``filter_batch``), recording ``quality_score`` in ``doc.meta``. ``counts`` holds
    ``documents``, ``kept`` and ``quality_classifier`` (removed)."""

    def __init__(self, *, n_features: int, coef: np.ndarray, intercept: float, alpha: float = PARETO_ALPHA,
                 seed: int = 0) -> None:
        coef = np.asarray(coef, dtype=np.float64).reshape(-1)
        if coef.shape[0] != n_features:
            raise ValueError(f"coef: {coef.shape[0]} weights for n_features={n_features}")
        if alpha <= 0:
            raise ValueError(f"alpha: must be positive, got {alpha}")
        self.n_features, self.coef, self.intercept = n_features, coef, float(intercept)
        self.alpha, self.seed = float(alpha), int(seed)
        self._vectorizer = _vectorizer(n_features)
        self.counts: Counter = Counter()
        self.report: dict = {}
        """The training report saved with the model (set by ``load``)."""

    def save(self, path: str, *, report: dict | None = None) -> None:
        meta = {"format": MODEL_FORMAT, "n_features": self.n_features, "intercept": self.intercept,
                "report": report or {}}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, coef=self.coef, meta=np.array(json.dumps(meta)))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str, *, alpha: float = PARETO_ALPHA, seed: int = 0) -> "QualityClassifier":
        try:
            with np.load(path, allow_pickle=False) as data:
                coef, meta = data["coef"], json.loads(str(data["meta"]))
        except FileNotFoundError as err:
            raise ValueError(f"model_path: no such file {path!r}") from err
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"model_path: {path!r} is not a gptforge quality classifier ({err})") from err
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"model_path: {path!r} has format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
        model = cls(n_features=int(meta["n_features"]), coef=coef, intercept=meta["intercept"], alpha=alpha,
                    seed=seed)
        model.report = meta.get("report") or {}
        return model

    def score(self, texts: list[str]) -> np.ndarray:
        """P(positive class), i.e. how much each text resembles the reference corpus, in [0, 1]."""
        from scipy.special import expit

        if not len(texts):
            return np.zeros(0)
        logits = self._vectorizer.transform(list(texts)) @ self.coef + self.intercept
        return expit(np.asarray(logits).reshape(-1))

    def keep(self, doc_id: str, score: float) -> bool:
        """GPT-3's rule, ``pareto(alpha) > 1 - score``, with the draw seeded by (seed, doc_id): the same
        document gets the same verdict in any run, shard or order."""
        digest = xxhash.xxh3_64_intdigest(f"{self.seed}\x00{doc_id}".encode("utf-8"))
        return bool(np.random.Generator(np.random.PCG64(digest)).pareto(self.alpha) > 1.0 - score)

    def merge(self, other_counts: Counter) -> None:
        self.counts.update(other_counts)

    def __call__(self, doc) -> str | None:
        return self.filter_batch([doc])[0]

    def filter_batch(self, docs: list) -> list[str | None]:
        """Score ``docs`` together, set ``doc.meta["quality_score"]``, and return per document None (keep)
        or ``"quality_classifier"``."""
        scores = self.score([doc.text for doc in docs])
        reasons: list[str | None] = []
        for doc, score in zip(docs, scores):
            doc.meta["quality_score"] = float(score)
            reason = None if self.keep(doc.id, float(score)) else REMOVAL_REASON
            self.counts["documents"] += 1
            self.counts[reason or "kept"] += 1
            reasons.append(reason)
        return reasons
