"""Benchmark decontamination as in GPT-3 (Brown et al. 2020, Appendix C).

The rules: n-grams (n = 13) of lowercased, punctuation-stripped, whitespace-split words; for each
benchmark n-gram found in a training document, remove the n-gram and 200 characters around it, which
splits the document into pieces; drop pieces under 200 characters; drop documents split into more than
10 pieces; ignore n-grams that occur in more than 10 training documents.

Our reading of the details:

* Punctuation is every character that is neither a word character (letter, digit) nor whitespace, and
  underscores: it is deleted inside tokens, so "don't" -> "dont" and "U.S." -> "us". Tokens that are
  only punctuation disappear. Benchmark and training text go through the same function.
* "200 characters around it" is 200 characters on each side: the removed span runs from 200 characters
  before the n-gram's first character to 200 characters after its last one (clipped to the document).
  Overlapping or touching spans merge into one.
* The pieces of a split are the non-blank stretches of text between removed spans, stripped of
  surrounding whitespace. "Split into more than 10 pieces" counts all of them, short ones included; the
  200-character minimum is then applied to the stripped pieces.
* Each surviving piece becomes its own document (the paper trains on them as separate documents):
  ``Decontaminator`` gives piece k (0-based, in text order) the id ``"{id}/{k}"``, the input's url and
  meta, plus ``meta["decontaminated_from"]`` = the input id. A document without a match passes unchanged.

Because "more than 10 training documents" needs the whole corpus, the work is split into phases that
a pipeline can run as separate jobs (e.g. SLURM array tasks):

1. ``BenchmarkNgrams.from_files(paths, fields, n=13)`` -> ``save(path)`` once;
2. per shard, ``count_ngram_documents(texts, ngrams).save(shard_counts_path)``; then once,
   ``NgramDocumentCounts.merge_files(paths).ignored(ngrams)`` -> the n-grams to ignore;
3. per shard, ``Decontaminator(ngrams, ignored)`` (or ``decontaminate(text, ngrams, ignored)``).

N-grams are kept as 64-bit hashes (a polynomial over xxh3 word hashes), so a benchmark's n-grams fit in
8 bytes each; a false match needs a 64-bit collision.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
import xxhash

from ...common.atomic import atomic_write_bytes
from ..readers.documents import JSONL_SUFFIXES, PARQUET_SUFFIXES, SkipLog, iter_records
from ..readers.web_document import WebDocument

NGRAMS_FORMAT = "gptforge-benchmark-ngrams-v1"
COUNTS_FORMAT = "gptforge-ngram-document-counts-v1"
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_TOKEN = re.compile(r"\S+")
# Odd 64-bit multiplier (the golden ratio's fraction) for combining word hashes into n-gram hashes.
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass(kw_only=True)
class DecontaminationConfig:
    """The GPT-3 Appendix C rules."""

    context_chars: int = 200
    """Characters removed on each side of a matched n-gram (GPT-3: "200 characters around it")."""
    min_piece_chars: int = 200
    """Pieces shorter than this (stripped) are dropped (GPT-3: 200)."""
    max_pieces: int = 10
    """Documents split into more pieces than this are dropped (GPT-3: 10)."""
    max_ngram_documents: int = 10
    """N-grams found in more training documents than this are ignored (GPT-3: 10)."""


def normalized_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(words, their (start, end) character spans in ``text``): whitespace-split tokens, lowercased,
    punctuation deleted, tokens left empty skipped."""
    words, spans = [], []
    for match in _TOKEN.finditer(text):
        word = _PUNCTUATION.sub("", match.group().lower())
        if word:
            words.append(word)
            spans.append(match.span())
    return words, spans


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """One uint64 per n-gram start (len(words) - n + 1 of them; none when fewer than n words)."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    word_hashes = np.fromiter((xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in words), dtype=np.uint64,
                              count=len(words))
    count = len(words) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    for j in range(n):  # uint64 arithmetic wraps modulo 2**64, which is what a hash wants
        acc = acc * _MULTIPLIER + word_hashes[j:j + count]
    return acc


def _strings(value) -> list[str]:
    """The strings of a record value: itself, or those nested in its lists and dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


@dataclass(kw_only=True)
class BenchmarkNgrams:
    """The hashed n-grams of a set of benchmark files (phase 1)."""

    n: int
    hashes: np.ndarray
    """Sorted, unique uint64 n-gram hashes."""
    sources: list[str] = field(default_factory=list)
    records: int = 0
    """Benchmark records read."""
    skipped: dict = field(default_factory=dict)
    """Skip reason -> count while reading (e.g. ``missing_field_question``)."""

    @classmethod
    def from_files(cls, paths: list[str], fields: list[str] | None = None, n: int = 13,
                   skips: SkipLog | None = None) -> "BenchmarkNgrams":
        """Read JSONL (plain, .gz, .zst) or Parquet benchmark files of test examples. ``fields`` names the
        record fields to read (strings, or lists/dicts of strings); None reads every string in each
        record. A record without a configured field, or with no string in it, is a counted skip for that
        field. Each string gives its own n-grams: none span two fields."""
        errors = []
        for path in paths:
            try:
                with open(path, "rb"):
                    pass
            except OSError as err:
                errors.append(f"benchmark file {path!r}: {err.strerror or err}")
                continue
            if not path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                suffixes = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
                errors.append(f"benchmark file {path!r}: expected one of {suffixes}")
        if not paths:
            errors.append("benchmark files: none given")
        if n < 1:
            errors.append(f"n: must be positive, got {n}")
        if errors:
            raise ValueError("; ".join(errors))
        skips = skips if skips is not None else SkipLog()
        chunks, records = [], 0
        for path in paths:
            for record, where in iter_records(path, None, skips):
                records += 1
                if fields is None:
                    texts = _strings(record)
                else:
                    texts = []
                    for name in fields:
                        if name not in record:
                            skips.add(f"missing_field_{name}", where)
                        elif not _strings(record[name]):
                            skips.add(f"non_string_{name}", where)
                        else:
                            texts.extend(_strings(record[name]))
                for text in texts:
                    chunks.append(ngram_hashes(normalized_words(text)[0], n))
        hashes = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.uint64)
        return cls(n=n, hashes=hashes, sources=list(paths), records=records, skipped=dict(skips.counts))

    @property
    def fingerprint(self) -> str:
        """Identifies this n-gram set: count files of another set cannot be merged with it."""
        return xxhash.xxh3_64_hexdigest(np.uint64(self.n).tobytes() + self.hashes.tobytes())

    def __len__(self) -> int:
        return len(self.hashes)

    def matches(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the index of the equal benchmark n-gram, or -1."""
        if not len(self.hashes) or not len(hashes):
            return np.full(len(hashes), -1, dtype=np.int64)
        index = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[index] == hashes, index, -1)

    def save(self, path: str) -> None:
        meta = {"format": NGRAMS_FORMAT, "n": self.n, "sources": self.sources, "records": self.records,
                "skipped": self.skipped}
        buffer = io.BytesIO()
        np.savez(buffer, hashes=self.hashes, meta=np.array(json.dumps(meta)))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "BenchmarkNgrams":
        hashes, meta = _load_npz(path, "hashes", NGRAMS_FORMAT)
        return cls(n=int(meta["n"]), hashes=hashes.astype(np.uint64), sources=meta["sources"],
                   records=int(meta["records"]), skipped=meta["skipped"])


def _load_npz(path: str, array: str, expected_format: str) -> tuple[np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as data:
            values, meta = data[array], json.loads(str(data["meta"]))
    except FileNotFoundError as err:
        raise ValueError(f"no such file {path!r}") from err
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path!r} is not a {expected_format} file ({err})") from err
    if meta.get("format") != expected_format:
        raise ValueError(f"{path!r} has format {meta.get('format')!r}, expected {expected_format!r}")
    return values, meta


@dataclass(kw_only=True)
class NgramDocumentCounts:
    """Per benchmark n-gram, in how many training documents it occurs (phase 2), aligned with
    ``BenchmarkNgrams.hashes``."""

    fingerprint: str
    counts: np.ndarray
    documents: int = 0
    """Training documents counted."""

    def add(self, other: "NgramDocumentCounts") -> None:
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"n-gram counts of another benchmark n-gram set ({other.fingerprint} != "
                             f"{self.fingerprint}): recount the shard with the same n-gram file")
        self.counts = self.counts + other.counts
        self.documents += other.documents

    def ignored(self, ngrams: BenchmarkNgrams, max_documents: int = 10) -> np.ndarray:
        """The hashes (sorted) of the n-grams in more than ``max_documents`` training documents
        (``DecontaminationConfig.max_ngram_documents``; GPT-3: 10)."""
        if ngrams.fingerprint != self.fingerprint:
            raise ValueError("these counts were made with another benchmark n-gram set")
        return ngrams.hashes[self.counts > max_documents]

    def save(self, path: str) -> None:
        meta = {"format": COUNTS_FORMAT, "fingerprint": self.fingerprint, "documents": self.documents}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, counts=self.counts, meta=np.array(json.dumps(meta)))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "NgramDocumentCounts":
        counts, meta = _load_npz(path, "counts", COUNTS_FORMAT)
        return cls(fingerprint=meta["fingerprint"], counts=counts.astype(np.int64), documents=int(meta["documents"]))

    @classmethod
    def merge_files(cls, paths: list[str]) -> "NgramDocumentCounts":
        if not paths:
            raise ValueError("count files: none given")
        merged = cls.load(paths[0])
        for path in paths[1:]:
            try:
                merged.add(cls.load(path))
            except ValueError as err:
                raise ValueError(f"count file {path!r}: {err}") from err
        return merged


def count_ngram_documents(texts: Iterable[str], ngrams: BenchmarkNgrams) -> NgramDocumentCounts:
    """Phase 2 on one shard: per benchmark n-gram, the number of ``texts`` containing it (once per text)."""
    counts = np.zeros(len(ngrams), dtype=np.int64)
    documents = 0
    for text in texts:
        documents += 1
        found = ngrams.matches(ngram_hashes(normalized_words(text)[0], ngrams.n))
        counts[np.unique(found[found >= 0])] += 1
    return NgramDocumentCounts(fingerprint=ngrams.fingerprint, counts=counts, documents=documents)


@dataclass(kw_only=True)
class DecontaminationResult:
    pieces: list[str]
    """The text unchanged (one piece) when nothing matched; else the surviving pieces, in order."""
    reason: str | None
    """Why the whole document goes: ``decontamination_too_many_pieces`` or
    ``decontamination_short_pieces`` (every piece under the minimum); None otherwise."""
    matches: int = 0
    """Benchmark n-gram occurrences found (ignored ones not included)."""
    ignored_matches: int = 0
    """Occurrences of ignored n-grams (left in place)."""
    split_pieces: int = 1
    """Pieces the removal split the text into, short ones included."""
    short_pieces: int = 0
    """Pieces dropped for being under the minimum."""


def decontaminate_details(text: str, ngrams: BenchmarkNgrams, ignored: np.ndarray | None = None,
                          cfg: DecontaminationConfig | None = None) -> DecontaminationResult:
    """Phase 3 on one text, with what was found (see the module docstring for the rules)."""
    cfg = cfg or DecontaminationConfig()
    words, spans = normalized_words(text)
    hashes = ngram_hashes(words, ngrams.n)
    starts = np.flatnonzero(ngrams.matches(hashes) >= 0)
    ignored_matches = 0
    if ignored is not None and len(ignored) and len(starts):
        skip = np.isin(hashes[starts], ignored)
        ignored_matches = int(skip.sum())
        starts = starts[~skip]
    if not len(starts):
        return DecontaminationResult(pieces=[text], reason=None, ignored_matches=ignored_matches)
    removed: list[list[int]] = []
    for start in starts.tolist():  # increasing, so each span starts at or after the previous one's start
        begin = max(0, spans[start][0] - cfg.context_chars)
        end = min(len(text), spans[start + ngrams.n - 1][1] + cfg.context_chars)
        if removed and begin <= removed[-1][1]:
            removed[-1][1] = max(removed[-1][1], end)
        else:
            removed.append([begin, end])
    bounds = [0] + [b for span in removed for b in span] + [len(text)]
    pieces = [text[bounds[i]:bounds[i + 1]].strip() for i in range(0, len(bounds), 2)]
    pieces = [piece for piece in pieces if piece]
    result = DecontaminationResult(pieces=[], reason=None, matches=len(starts), ignored_matches=ignored_matches,
                                   split_pieces=len(pieces))
    if len(pieces) > cfg.max_pieces:
        result.reason = "decontamination_too_many_pieces"
        return result
    result.pieces = [piece for piece in pieces if len(piece) >= cfg.min_piece_chars]
    result.short_pieces = len(pieces) - len(result.pieces)
    if not result.pieces:
        result.reason = "decontamination_short_pieces"
    return result


def decontaminate(doc_or_text: WebDocument | str, ngrams: BenchmarkNgrams, ignored: np.ndarray | None = None,
                  cfg: DecontaminationConfig | None = None) -> tuple[list[str], str | None]:
    """(pieces, reason) for one document or text: ``[text]`` and None when nothing matched; the
    surviving pieces and None after a removal; ``[]`` and the reason when the whole document goes."""
    text = doc_or_text.text if isinstance(doc_or_text, WebDocument) else doc_or_text
    result = decontaminate_details(text, ngrams, ignored, cfg)
    return result.pieces, result.reason


class Decontaminator:
    """Phase 3 over documents: ``__call__(doc)`` returns the documents to write in its place (itself when
    clean, its pieces as ``"{id}/{k}"`` otherwise, none when dropped). ``counts``: ``documents``,
    ``documents_contaminated``, ``ngram_matches``, ``ngram_matches_ignored``, ``pieces_kept``,
    ``pieces_dropped_short``, and one entry per document removal reason (``documents_dropped:<reason>``).
    ``ngrams_ignored`` is the size of the ignored set, the same in every worker."""

    def __init__(self, ngrams: BenchmarkNgrams, ignored: np.ndarray | None = None,
                 cfg: DecontaminationConfig | None = None) -> None:
        self.ngrams = ngrams
        self.ignored = np.sort(np.asarray(ignored if ignored is not None else [], dtype=np.uint64))
        self.cfg = cfg or DecontaminationConfig()
        self.ngrams_ignored = len(self.ignored)
        self.counts: Counter = Counter()

    def merge(self, other_counts: Counter) -> None:
        self.counts.update(other_counts)

    def __call__(self, doc: WebDocument) -> list[WebDocument]:
        result = decontaminate_details(doc.text, self.ngrams, self.ignored, self.cfg)
        self.counts["documents"] += 1
        self.counts["ngram_matches_ignored"] += result.ignored_matches
        if not result.matches:
            return [doc]
        self.counts["documents_contaminated"] += 1
        self.counts["ngram_matches"] += result.matches
        self.counts["pieces_kept"] += len(result.pieces)
        self.counts["pieces_dropped_short"] += result.short_pieces
        if result.reason is not None:
            self.counts[f"documents_dropped:{result.reason}"] += 1
            return []
        return [replace(doc, id=f"{doc.id}/{k}", text=piece, meta=doc.meta | {"decontaminated_from": doc.id})
                for k, piece in enumerate(result.pieces)]
