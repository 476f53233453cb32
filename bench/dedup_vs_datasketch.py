"""gptforge dedup (phases 1 + 2, one worker) vs datasketch MinHash + MinHashLSH on the same corpus.

The corpus: ``--docs`` generated documents (words drawn from the stdlib docstring vocabulary with a seeded
RNG, 200-600 words each) plus planted near-duplicate pairs of exact word-5-gram Jaccard: positives at
0.85, 0.9, 0.95 (should be found at threshold 0.8) and negatives at 0.5, 0.6, 0.7 (should not).
Both sides read the same JSONL, use the same words (``normalize_text``), the same 5-gram shingles,
num_perm and threshold; datasketch's LSH gets the bands/rows it picks itself (the same weighted-area
rule). Recall: planted positives linked; precision: linked pairs that are planted positives.

    .venv/bin/python bench/dedup_vs_datasketch.py --docs 4000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from conftest import stdlib_docstrings  # noqa: E402
from gptforge.data_prep.dedup import DedupConfig, cluster_signatures, compute_signatures, normalize_text  # noqa: E402
from gptforge.data_prep.documents import SkipLog, iter_records  # noqa: E402

POSITIVE = (0.85, 0.9, 0.95)
NEGATIVE = (0.5, 0.6, 0.7)


def build_corpus(path: str, n_docs: int, pairs_per_level: int, seed: int) -> list[tuple[str, str, float]]:
    """Write the corpus; return the planted pairs (original id, copy id, Jaccard)."""
    rng = random.Random(seed)
    vocab = sorted({w for doc in stdlib_docstrings(400) for w in re.findall(r"[A-Za-z]+", doc)})
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


def run_ours(path: str, work: str, num_perm: int, threshold: float) -> tuple[float, set[frozenset], int]:
    config = DedupConfig(num_perm=num_perm, threshold=threshold, url=False, exact=False)
    start = time.perf_counter()
    shard = compute_signatures(path, os.path.join(work, "sig.npz"), config)
    summary = cluster_signatures([os.path.join(work, "sig.npz")], os.path.join(work, "rm.npz"), config)
    seconds = time.perf_counter() - start
    import numpy as np

    with np.load(os.path.join(work, "rm.npz")) as rm:
        blobs = {key: rm[key] for key in rm.files}
    def ids(prefix):
        blob, offsets = blobs[f"{prefix}_id_blob"], blobs[f"{prefix}_id_offsets"]
        return [blob[offsets[k]:offsets[k + 1]].tobytes().decode() for k in range(len(offsets) - 1)]
    links = {frozenset(pair) for pair in zip(ids("removed"), ids("survivor"))}
    print(f"ours: bands x rows = {summary.bands} x {summary.rows}, {summary.candidate_pairs} candidates, "
          f"{summary.rejected_pairs} rejected by verification")
    return seconds, links, shard.records


def run_datasketch(path: str, num_perm: int, threshold: float, batch: bool, limit: int | None):
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    links, n = set(), 0
    for record, _ in iter_records(path, "text", SkipLog()):
        if limit is not None and n >= limit:
            break
        words = normalize_text(record["text"]).decode("utf-8").split()
        shingles = [" ".join(words[i:i + 5]).encode("utf-8") for i in range(max(len(words) - 4, 1))]
        sketch = MinHash(num_perm=num_perm)
        if batch:
            sketch.update_batch(shingles)
        else:
            for shingle in shingles:
                sketch.update(shingle)
        for other in lsh.query(sketch):  # earlier documents in the same bucket
            links.add(frozenset((record["id"], other)))
        lsh.insert(record["id"], sketch)
        n += 1
    return time.perf_counter() - start, links, n, lsh.b, lsh.r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--pairs", type=int, default=50, help="planted pairs per Jaccard level")
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--update-docs", type=int, default=500,
                        help="documents timed with datasketch's per-shingle update() (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "corpus.jsonl")
        planted = build_corpus(path, args.docs, args.pairs, args.seed)
        ours_s, ours_links, n = run_ours(path, work, args.num_perm, args.threshold)
        ds_s, ds_links, _, b, r = run_datasketch(path, args.num_perm, args.threshold, batch=True, limit=None)
        upd_s, _, upd_n, _, _ = run_datasketch(path, args.num_perm, args.threshold, batch=False,
                                               limit=args.update_docs)
    ours_rate, ds_rate, upd_rate = n / ours_s, n / ds_s, upd_n / upd_s
    result = {
        "documents": n, "num_perm": args.num_perm, "threshold": args.threshold, "datasketch_bands_rows": [b, r],
        "ours_docs_per_s": round(ours_rate, 1), "datasketch_update_batch_docs_per_s": round(ds_rate, 1),
        "datasketch_update_docs_per_s": round(upd_rate, 1),
        "ratio_vs_update_batch": round(ours_rate / ds_rate, 2), "ratio_vs_update": round(ours_rate / upd_rate, 2),
        "ours": score(ours_links, planted), "datasketch": score(ds_links, planted),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
