"""gptforge dedup vs datasketch MinHash + MinHashLSH on the same corpus, side by side in one process.

The corpus: ``--docs`` generated documents (words drawn from the stdlib docstring vocabulary with a seeded
RNG, 200-600 words each) plus planted near-duplicate pairs of exact word-5-gram Jaccard: positives at
0.85, 0.9, 0.95 (should be found at threshold 0.8) and negatives at 0.5, 0.6, 0.7 (should not).

Both sides use the same words (``normalize_text``), the same 5-gram shingles, num_perm and threshold.
datasketch runs its documented bulk path (``MinHash.generator``: permutations built once, not per
document) into a ``MinHashLSH`` with the (bands, rows) it picks itself (query, then insert);
gptforge runs with ``DedupConfig`` defaults. Two timed regions, both sides doing the same work in each:

* ``in_memory``: from the same list of already-read, already-normalised texts to near-duplicate links:
  gptforge ``MinHasher.batch`` per batch (cut as phase 1 cuts them) + ``near_duplicate_labels``;
  datasketch splits words, builds shingle byte strings, ``update_batch``, query + insert.
* ``end_to_end``: from the JSONL file: gptforge phases 1 + 2 (``compute_signatures`` +
  ``cluster_signatures``, writing their ``.npz`` files); datasketch reads the records with the same
  reader and takes the words of ``normalize_text`` (NFKC, lowercase, ``str.split``), then as above.

Times are CPU seconds of this process (``time.process_time``: per core, and less disturbed by other
jobs on a shared machine than wall time), the median of ``--trials`` runs that alternate the sides.
Recall: planted positives linked; precision: linked pairs that are planted positives.

    .venv/bin/python bench/dedup_vs_datasketch.py --docs 4000 --trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import time
import unicodedata

import numpy as np

from gptforge.data_prep.dedup.dedup import (DedupConfig, cluster_signatures, compute_signatures,
                                            near_duplicate_labels, normalize_text)
from gptforge.data_prep.dedup.minhash import MinHasher
from gptforge.data_prep.readers.documents import SkipLog, iter_records
from gptforge.data_prep.readers.text_files import stdlib_docstrings

POSITIVE = (0.85, 0.9, 0.95)
NEGATIVE = (0.5, 0.6, 0.7)


def stdlib_vocabulary(docs: int = 400) -> list[str]:
    """The words (runs of letters) of the standard library's docstrings: real English every machine with
    Python has."""
    return sorted({word for text in stdlib_docstrings(docs) for word in re.findall(r"[A-Za-z]+", text)})


def build_corpus(path: str, n_docs: int, pairs_per_level: int, seed: int) -> list[tuple[str, str, float]]:
    """Write the corpus; return the planted pairs (original id, copy id, Jaccard)."""
    rng = random.Random(seed)
    vocab = stdlib_vocabulary()
    records, planted = [], []
    for i in range(n_docs):
        records.append({"id": f"doc{i}", "text": " ".join(rng.choices(vocab, k=rng.randint(200, 600)))})
    for jaccard in POSITIVE + NEGATIVE:
        # N distinct words, last k replaced: shared 5-grams N-k-4 of 2(N-4)-(N-k-4) -> k = (N-4)(1-J)/(1+J)
        shingles = next(s for s in range(300, 3000) if abs(s * (1 - jaccard) / (1 + jaccard) % 1) < 1e-9)
        k = round(shingles * (1 - jaccard) / (1 + jaccard))
        for p in range(pairs_per_level):
            words = [f"{rng.choice(vocab)}{j}" for j in range(shingles + 4 + k)]  # index suffix: all distinct
            tag = f"j{jaccard}p{p}"
            records.append({"id": f"{tag}a", "text": " ".join(words[:shingles + 4])})
            records.append({"id": f"{tag}b", "text": " ".join(words[:shingles + 4 - k] + words[shingles + 4:])})
            planted.append((f"{tag}a", f"{tag}b", jaccard))
    rng.shuffle(records)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return planted


def score(links: set[frozenset], planted: list[tuple[str, str, float]]) -> dict:
    positives = {frozenset((a, b)) for a, b, j in planted if j in POSITIVE}
    found = links & positives
    per_level = {str(j): sum(frozenset((a, b)) in links for a, b, jj in planted if jj == j) / sum(
        1 for *_, jj in planted if jj == j) for j in POSITIVE + NEGATIVE}
    return {"recall": len(found) / len(positives), "precision": len(found) / len(links) if links else 1.0,
            "links": len(links), "linked_fraction_by_jaccard": per_level}


def _links(ids: list[str], labels: np.ndarray) -> set[frozenset]:
    """Each fuzzy-removed document linked to its cluster's first document (the survivor)."""
    return {frozenset((ids[k], ids[first])) for k, first in enumerate(labels.tolist()) if first != k}


def ours_in_memory(ids: list[str], texts: list[bytes], config: DedupConfig) -> tuple[float, set[frozenset], tuple]:
    start = time.process_time()
    hasher = MinHasher(num_perm=config.num_perm, ngram=config.ngram, seed=config.seed)
    parts, batch, size = [], [], 0  # batches cut as compute_signatures cuts them
    for text in texts:
        batch.append(text)
        size += len(text)
        if config.batch_full(len(batch), size):
            parts.append(hasher.batch(batch))
            batch, size = [], 0
    if batch:
        parts.append(hasher.batch(batch))
    signatures = np.concatenate([sig for sig, _ in parts])  # [n_docs, num_perm] uint32
    members = np.flatnonzero(np.concatenate([has for _, has in parts]))
    shape = config.lsh_shape()
    labels, candidates, rejected = near_duplicate_labels(signatures[members], config, shape)
    seconds = time.process_time() - start
    kept_ids = [ids[k] for k in members.tolist()]
    return seconds, _links(kept_ids, labels), (*shape, candidates, rejected)


def ours_end_to_end(path: str, work: str, config: DedupConfig) -> tuple[float, set[frozenset]]:
    start = time.process_time()
    compute_signatures(path, os.path.join(work, "sig.npz"), config)
    cluster_signatures([os.path.join(work, "sig.npz")], os.path.join(work, "rm.npz"), config)
    seconds = time.process_time() - start
    with np.load(os.path.join(work, "rm.npz")) as rm:
        blobs = {key: rm[key] for key in rm.files}

    def ids(prefix: str) -> list[str]:
        blob, offsets = blobs[f"{prefix}_id_blob"], blobs[f"{prefix}_id_offsets"]
        return [blob[offsets[k]:offsets[k + 1]].tobytes().decode() for k in range(len(offsets) - 1)]

    return seconds, {frozenset(pair) for pair in zip(ids("removed"), ids("survivor"))}


def _shingles(words: list[str], ngram: int) -> list[bytes]:
    """datasketch's input: the word n-grams as UTF-8 byte strings (one n-gram if fewer words)."""
    return [" ".join(words[i:i + ngram]).encode("utf-8") for i in range(max(len(words) - ngram + 1, 1))]


def datasketch_links(docs, num_perm: int, threshold: float, ngram: int):
    """datasketch over an iterable of (id, words): (links, (bands, rows))."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    links, ids = set(), []

    def shingle_lists():
        for doc_id, words in docs:
            ids.append(doc_id)
            yield _shingles(words, ngram)

    for sketch in MinHash.generator(shingle_lists(), num_perm=num_perm):
        doc_id = ids[-1]  # the generator pulls one document per sketch
        for other in lsh.query(sketch):  # earlier documents sharing a band
            links.add(frozenset((doc_id, other)))
        lsh.insert(doc_id, sketch)
    return links, (lsh.b, lsh.r)


def datasketch_in_memory(ids, texts, num_perm, threshold, ngram):
    start = time.process_time()
    docs = ((doc_id, text.decode("utf-8").split()) for doc_id, text in zip(ids, texts))
    links, shape = datasketch_links(docs, num_perm, threshold, ngram)
    return time.process_time() - start, links, shape


def datasketch_end_to_end(path, num_perm, threshold, ngram):
    start = time.process_time()
    # the words of normalize_text, without its join (datasketch needs the words, not the text)
    docs = ((record["id"], unicodedata.normalize("NFKC", record["text"]).lower().split())
            for record, _ in iter_records(path, "text", SkipLog()))
    links, shape = datasketch_links(docs, num_perm, threshold, ngram)
    return time.process_time() - start, links, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--pairs", type=int, default=50, help="planted pairs per Jaccard level")
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--trials", type=int, default=3, help="timed runs per side and region (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = DedupConfig(num_perm=args.num_perm, threshold=args.threshold, url=False, exact=False)
    times: dict[str, list[float]] = {key: [] for key in ("ours_mem", "ds_mem", "ours_e2e", "ds_e2e")}
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "corpus.jsonl")
        planted = build_corpus(path, args.docs, args.pairs, args.seed)
        records = [record for record, _ in iter_records(path, "text", SkipLog())]
        ids = [record["id"] for record in records]
        texts = [normalize_text(record["text"]) for record in records]
        for _ in range(args.trials):  # alternate the sides so load changes on the machine hit both
            seconds, ours_links, ours_shape = ours_in_memory(ids, texts, config)
            times["ours_mem"].append(seconds)
            seconds, ds_links, ds_shape = datasketch_in_memory(ids, texts, args.num_perm, args.threshold, config.ngram)
            times["ds_mem"].append(seconds)
            seconds, e2e_links = ours_end_to_end(path, work, config)
            times["ours_e2e"].append(seconds)
            if e2e_links != ours_links:
                raise AssertionError("gptforge end-to-end links differ from its in-memory links")
            seconds, ds_e2e_links, _ = datasketch_end_to_end(path, args.num_perm, args.threshold, config.ngram)
            times["ds_e2e"].append(seconds)
            if ds_e2e_links != ds_links:
                raise AssertionError("datasketch end-to-end links differ from its in-memory links")
    n = len(texts)
    rate = {key: n / statistics.median(values) for key, values in times.items()}
    bands, rows, candidates, rejected = ours_shape
    result = {
        "documents": n, "num_perm": args.num_perm, "threshold": args.threshold, "trials": args.trials,
        "timed": "CPU seconds of this process, median of the trials",
        "in_memory": {"ours_docs_per_s": round(rate["ours_mem"], 1), "datasketch_docs_per_s": round(rate["ds_mem"], 1),
                      "ratio": round(rate["ours_mem"] / rate["ds_mem"], 2)},
        "end_to_end": {"ours_docs_per_s": round(rate["ours_e2e"], 1), "datasketch_docs_per_s": round(rate["ds_e2e"], 1),
                       "ratio": round(rate["ours_e2e"] / rate["ds_e2e"], 2)},
        "seconds": {key: [round(value, 3) for value in values] for key, values in times.items()},
        "ours": {"bands_rows": [bands, rows], "candidate_pairs": candidates, "rejected_pairs": rejected,
                 **score(ours_links, planted)},
        "datasketch": {"bands_rows": list(ds_shape), **score(ds_links, planted)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
