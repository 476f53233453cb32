"""gptforge dedup: MinHash estimates, LSH shape, planted near-duplicates of exact Jaccard, exact and URL
dedup, deterministic survivors across workers, the CLI end to end, bad input and bad flags."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from helpers.corpus import stdlib_docstrings
from gptforge.data_prep.dedup.config import DedupConfig
from gptforge.data_prep.dedup.dedup import cluster_signatures, compute_signatures
from gptforge.data_prep.dedup.keys import normalize_text, normalize_url
from gptforge.data_prep.dedup.cli import run_dedup
from gptforge.data_prep.dedup.minhash import MinHasher, connected_min_labels, optimal_bands_rows
from gptforge.launcher.cli import main


def lsh_error_area(threshold: float, bands: int, rows: int, *, false_positive_weight: float = 0.5,
                   false_negative_weight: float = 0.5, grid: int = 1001) -> float:
    """What ``optimal_bands_rows`` minimises, for one shape: the weighted area under the S-curve
    P(candidate | s) = 1 - (1 - s^rows)^bands below ``threshold`` (false positives) plus the area above it
    under 1 - P (false negatives), by the trapezoid rule."""
    below = np.linspace(0.0, threshold, grid)
    above = np.linspace(threshold, 1.0, grid)
    fp = np.trapezoid(1.0 - (1.0 - below**rows) ** bands, below)
    fn = np.trapezoid((1.0 - above**rows) ** bands, above)
    return float(false_positive_weight * fp + false_negative_weight * fn)


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """P(two documents of Jaccard ``similarity`` share at least one band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def shingle_set_hashes(hasher: MinHasher, text: bytes) -> set[int]:
    """The set of 32-bit shingle hashes of one normalised text."""
    shingles, _ = hasher.shingle_hashes(*hasher.word_hashes([text]))
    return set(shingles.tolist())


def unique_words(rng: random.Random, count: int, tag: str) -> list[str]:
    """``count`` words no other call returns (the tag and index make them unique), so 5-grams are distinct."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [f"{''.join(rng.choice(letters) for _ in range(rng.randint(2, 7)))}{tag}x{i}" for i in range(count)]


def planted_pair(rng: random.Random, jaccard: float, tag: str) -> tuple[str, str]:
    """Two texts whose word-5-gram sets have exactly the given Jaccard: N distinct words, then the last k
    words replaced by new ones. Shared 5-grams N-k-4 of 2(N-4)-(N-k-4), so k = (N-4)(1-J)/(1+J)."""
    for shingles in range(380, 2000):
        k = shingles * (1 - jaccard) / (1 + jaccard)
        if abs(k - round(k)) < 1e-9:
            break
    k = round(k)
    words = unique_words(rng, shingles + 4, tag)
    variant = words[:-k] + unique_words(rng, k, tag + "v")
    return " ".join(words), " ".join(variant)


def exact_jaccard(a: str, b: str) -> float:
    hasher = MinHasher()
    sa = shingle_set_hashes(hasher, normalize_text(a))
    sb = shingle_set_hashes(hasher, normalize_text(b))
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def real_docs() -> list[str]:
    """Distinct stdlib docstrings (the helper's list repeats some, e.g. a module's own docstring)."""
    return list(dict.fromkeys(stdlib_docstrings(300)))


def write_jsonl(path, records: list[dict], bad_lines: tuple[str, ...] = ()) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in bad_lines:
            handle.write(line + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_minhash_estimate_is_unbiased_with_binomial_variance():
    hasher = MinHasher(num_perm=128, seed=5)
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(300):  # shingle sets of Jaccard 60 / (60 + 2 * 70) = 0.3
        values = rng.choice(1 << 32, 200, replace=False).astype(np.uint32)
        a, b = values[:130], np.concatenate([values[:60], values[130:]])
        sig = hasher.signatures(np.concatenate([a, b]), np.array([len(a), len(b)]))
        estimates.append((sig[0] == sig[1]).mean())
    estimates = np.array(estimates)
    assert abs(estimates.mean() - 0.3) < 0.01
    assert 0.6 < estimates.var() / (0.3 * 0.7 / 128) < 1.5


def test_signature_of_split_batches_equals_one_batch():
    # a document cut by the hashing block boundary must get the same signature as when hashed alone
    hasher = MinHasher(num_perm=16)
    rng = random.Random(1)
    docs = [" ".join(unique_words(rng, n, f"d{n}")).encode() for n in (3000, 5000, 2, 0, 7)]
    together, has = hasher.batch(docs)
    for doc, row, flag in zip(docs, together, has):
        alone, alone_has = hasher.batch([doc])
        assert np.array_equal(alone[0], row) and alone_has[0] == flag
    assert has.tolist() == [True, True, True, False, True]


_M64, _M32 = (1 << 64) - 1, (1 << 32) - 1


def reference_signature(hasher: MinHasher, text: bytes) -> tuple[list[int], bool]:
    """One document's signature in plain Python integers, following the hash definitions of
    ``minhash.py`` step by step (no numpy, no batching): the ground truth for the vectorised path."""
    def word_hash(word: bytes) -> int:
        h = len(word) * 0xC4CEB9FE1A85EC53 & _M64
        for k in range(0, len(word), 8):
            h = (h ^ int.from_bytes(word[k:k + 8], "little")) * 0x9E3779B97F4A7C15 & _M64
            h ^= h >> 29
        h ^= h >> 31
        h = h * 0xFF51AFD7ED558CCD & _M64
        return h ^ (h >> 29)

    words = [word_hash(w) for w in text.split(b" ") if w]
    gram_mul = [int(m) for m in hasher._gram_mul]
    n = hasher.ngram
    starts = range(len(words) - n + 1) if len(words) >= n else ([0] if words else [])
    shingles = []
    for i in starts:
        g = sum(w * m for w, m in zip(words[i:i + n], gram_mul)) & _M64
        for mul in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, None):
            g ^= g >> 33
            g = g * mul & _M64 if mul else g
        shingles.append(g >> 32)
    perms = zip(hasher._mul[:, 0].tolist(), hasher._add[:, 0].tolist())
    return [min(((a * x + b) & _M32 for x in shingles), default=_M32) for a, b in perms], bool(shingles)


def test_batch_signatures_equal_per_document_reference_bit_for_bit():
    # edge cases of the vectorised path: empty and short documents, words longer than one or two 8-byte
    # chunks, multi-byte UTF-8, NUL bytes (only the length tells "a" from "a\0"), documents that
    # straddle a hashing block (8192 shingles), and a batch starting and ending with empty texts
    rng = random.Random(5)
    alphabet = "abcdefghij\u00e9\u4e2d\U0001f600\x00"
    def word():
        return "".join(rng.choice(alphabet) for _ in range(rng.choice((1, 2, 7, 8, 9, 15, 16, 17, 25, 40))))
    docs = [b"", b"a", b"a\x00", b"x y z w", b"one two three four five"]
    docs += [" ".join(word() for _ in range(rng.randint(0, 60))).encode() for _ in range(40)]
    docs += [" ".join(word() for _ in range(n)).encode() for n in (5000, 4000)] + [b""]
    for num_perm, ngram in ((16, 5), (7, 3)):
        hasher = MinHasher(num_perm=num_perm, ngram=ngram, seed=num_perm)
        batch, has = hasher.batch(docs)
        assert batch.dtype == np.uint32 and batch.shape == (len(docs), num_perm)
        for doc, row, flag in zip(docs, batch, has):
            expected, expected_flag = reference_signature(hasher, doc)
            assert row.tolist() == expected and flag == expected_flag, doc[:40]
    assert has.tolist()[:5] == [False, True, True, True, True] and not has[-1]
    assert len({bytes(row) for row in batch[5:45][has[5:45]]}) == int(has[5:45].sum())  # no collisions


def test_phase1_fast_normalisation_equals_normalize_text(tmp_path):
    # phase 1 collapses whitespace in the batch buffer instead of per document: its exact keys and
    # signatures must equal those of normalize_text, for every ASCII whitespace str.split knows and
    # for Unicode texts (which take the per-document path)
    texts = ["", "   ", "\t\n", "One", " lead and trail ", "a\x1cb\x1dc\x1ed\x1fe\x0bf\x0cg\rh",
             "Tabs\tand\n\nnew  lines  " * 30, "x " * 3, "\u00a0nbsp\u2028line\u3000ideo ﬁle \u0085end",
             "ÉCOLE  été\tCafé", "same words here", "SAME   words\there"]
    texts += [chr(c) + "x" + chr(c) + "y" for c in range(128)]  # every ASCII byte as a separator or not
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    config = DedupConfig(url=False, batch_docs=7)  # several batches, some starting with empty texts
    compute_signatures(path, str(tmp_path / "sig.npz"), config)
    with np.load(tmp_path / "sig.npz") as npz:
        text_hash, signatures, has = npz["text_hash"], npz["signatures"], npz["has_shingles"]
    normalized = [normalize_text(t) for t in texts]
    expected, expected_has = MinHasher(num_perm=config.num_perm, seed=config.seed).batch(normalized)
    for k, norm in enumerate(normalized):
        key = xxhash.xxh3_128_intdigest(norm)
        assert text_hash[k].tolist() == [key >> 64, key & (1 << 64) - 1], texts[k]
    assert np.array_equal(signatures, expected) and np.array_equal(has, expected_has)
    assert text_hash[10].tolist() == text_hash[11].tolist()  # normalisation makes them equal
    # a signature file of another hash layout is refused, not silently compared
    with np.load(tmp_path / "sig.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["version"] = 1
    np.savez(tmp_path / "old.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(ValueError, match="layout version 1"):
        cluster_signatures([str(tmp_path / "sig.npz"), str(tmp_path / "old.npz")], str(tmp_path / "rm.npz"), config)


def test_lsh_shape_for_threshold_and_explicit():
    bands, rows = optimal_bands_rows(0.8, 128)
    assert bands * rows <= 128
    assert candidate_probability(0.95, bands, rows) > 0.99
    assert candidate_probability(0.5, bands, rows) < 0.01
    assert DedupConfig(bands=16, rows=8).lsh_shape() == (16, 8)
    # a lower threshold moves the S-curve left: more bands of fewer rows
    low_bands, low_rows = optimal_bands_rows(0.5, 128)
    assert low_rows < rows
    # the vectorised search picks what scoring every shape with lsh_error_area picks
    for threshold, weights in ((0.8, (0.1, 0.9)), (0.5, (0.5, 0.5))):
        scores = {(b, r): lsh_error_area(threshold, b, r, false_positive_weight=weights[0],
                                         false_negative_weight=weights[1])
                  for b in range(1, 65) for r in range(1, 64 // b + 1)}
        assert optimal_bands_rows(threshold, 64, false_positive_weight=weights[0],
                                  false_negative_weight=weights[1]) == min(scores, key=scores.get)
    # the default config weights false negatives 9:1 (verification removes false positives): a pair
    # just above the threshold is almost always a candidate, one far below it rarely
    default_bands, default_rows = DedupConfig().lsh_shape()
    assert (default_bands, default_rows) == (14, 9)
    assert candidate_probability(0.85, default_bands, default_rows) > 0.97 > candidate_probability(0.85, bands, rows)
    assert candidate_probability(0.5, default_bands, default_rows) < 0.03


def test_connected_min_labels_matches_python_union_find():
    rng = np.random.default_rng(3)
    n = 500
    left, right = rng.integers(0, n, 400), rng.integers(0, n, 400)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert connected_min_labels(n, left, right).tolist() == [find(x) for x in range(n)]


def test_normalize_url_rules():
    assert normalize_url("HTTP://Example.COM:80/a/b/?z=1&a=2#frag") == "http://example.com/a/b?a=2&z=1"
    assert normalize_url("https://example.com:443/") == normalize_url("https://example.com")
    assert normalize_url("https://example.com:8443/x") == "https://example.com:8443/x"
    assert normalize_url("http://example.com/A") != normalize_url("http://example.com/a")  # paths keep case
    assert normalize_text("  The\u00a0ﬁle\n\tIS  here ") == b"the file is here"


def test_planted_near_duplicates_fuzzy(tmp_path, real_docs):
    rng = random.Random(7)
    pairs = {j: planted_pair(rng, j, f"j{int(j * 100)}") for j in (0.95, 0.9, 0.6, 0.5)}
    for j, (a, b) in pairs.items():
        assert exact_jaccard(a, b) == pytest.approx(j, abs=1e-9)
    records = [{"id": f"real{i}", "text": text} for i, text in enumerate(real_docs)]
    for j, (a, b) in pairs.items():
        records += [{"id": f"orig{j}", "text": a}, {"id": f"copy{j}", "text": b}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    report = run_dedup([path], str(tmp_path / "out"), DedupConfig())
    dups = {d["id"]: d for d in read_jsonl(tmp_path / "out" / "duplicates.jsonl")}
    assert dups["copy0.95"] == {"id": "copy0.95", "duplicate_of": "orig0.95", "reason": "duplicate_fuzzy"}
    assert dups["copy0.9"] == {"id": "copy0.9", "duplicate_of": "orig0.9", "reason": "duplicate_fuzzy"}
    for j in (0.6, 0.5):
        assert f"copy{j}" not in dups and f"orig{j}" not in dups
    # distinct real documents survive (a few stdlib docstrings are near-copies of each other)
    assert sum(1 for key in dups if key.startswith("real")) <= 0.05 * len(real_docs)
    assert report["documents"] == len(records)
    assert report["kept"] == len(records) - len(dups)


def test_verify_rejects_band_collisions(tmp_path, real_docs):
    # one row per band makes nearly every pair of documents a candidate: verification must reject them
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in real_docs[:80]])
    summaries = {}
    for verify in (True, False):
        config = DedupConfig(bands=64, rows=1, verify=verify, url=False, exact=False)
        compute_signatures(path, str(tmp_path / "sig.npz"), config)
        summaries[verify] = cluster_signatures([str(tmp_path / "sig.npz")], str(tmp_path / "rm.npz"), config)
    assert summaries[True].rejected_pairs > 0
    assert summaries[True].removed["duplicate_fuzzy"] <= 4
    assert summaries[False].removed["duplicate_fuzzy"] > 10


def test_exact_and_url_dedup(tmp_path, real_docs):
    text = real_docs[0]
    records = [
        {"id": "a", "text": text, "url": "https://site.org/page?x=1&y=2"},
        {"id": "b", "text": "  " + text.upper().replace(" ", "\t "), "url": "https://other.org/"},
        {"id": "c", "text": real_docs[1], "url": "HTTPS://SITE.org:443/page/?y=2&x=1#top"},
        {"id": "d", "text": real_docs[2]},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    run_dedup([path], str(tmp_path / "out"), DedupConfig())
    dups = read_jsonl(tmp_path / "out" / "duplicates.jsonl")
    assert dups == [{"id": "b", "duplicate_of": "a", "reason": "duplicate_exact"},
                    {"id": "c", "duplicate_of": "a", "reason": "duplicate_url"}]
    # the kinds are switchable: without exact dedup the case/space variant is a fuzzy duplicate (Jaccard 1)
    run_dedup([path], str(tmp_path / "out2"), DedupConfig(exact=False, url=False))
    assert read_jsonl(tmp_path / "out2" / "duplicates.jsonl") == [
        {"id": "b", "duplicate_of": "a", "reason": "duplicate_fuzzy"}]


def test_survivor_is_first_in_input_order_for_any_workers(tmp_path, real_docs):
    rng = random.Random(11)
    original, variant = planted_pair(rng, 0.95, "s")
    shard0 = [{"id": f"x{i}", "text": t} for i, t in enumerate(real_docs[:40])] + [{"id": "late", "text": variant}]
    shard1 = [{"id": "early_in_shard1", "text": original}] + [{"id": f"y{i}", "text": t}
                                                              for i, t in enumerate(real_docs[40:80])]
    shard2 = [{"id": "exact", "text": original}] + [{"id": f"z{i}", "text": t} for i, t in enumerate(real_docs[80:120])]
    paths = [write_jsonl(tmp_path / f"s{i}.jsonl", s) for i, s in enumerate((shard0, shard1, shard2))]
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        run_dedup(paths, str(out), DedupConfig(), workers=workers)
        outputs[workers] = {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != "report.json"}
    assert outputs[1] == outputs[2]
    dups = {d["id"]: d for d in read_jsonl(tmp_path / "out1" / "duplicates.jsonl")}
    assert dups["early_in_shard1"]["duplicate_of"] == "late"  # shard 0 comes first, whatever its position
    assert dups["exact"] == {"id": "exact", "duplicate_of": "early_in_shard1", "reason": "duplicate_exact"}
    assert "late" not in dups


def test_cli_end_to_end(tmp_path, real_docs):
    records = [{"id": i, "text": t, "meta": {"n": i}} for i, t in enumerate(real_docs[:60])]
    records.append({"id": 1000, "text": real_docs[3], "meta": {"n": 1000}})  # exact copy of id 3
    first = write_jsonl(tmp_path / "a.jsonl", records[:30], bad_lines=("{not json", json.dumps({"id": 5})))
    second = write_jsonl(tmp_path / "b.jsonl", records[30:])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptforge.launcher.cli", "dedup", first, second, "-o", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dups = read_jsonl(out / "duplicates.jsonl")
    assert {"id": "1000", "duplicate_of": "3", "reason": "duplicate_exact"} in dups
    removed = {d["id"] for d in dups}
    kept = read_jsonl(out / "kept-00000.jsonl") + read_jsonl(out / "kept-00001.jsonl")
    assert kept == [r for r in records if str(r["id"]) not in removed]  # unchanged, in input order
    report = json.loads((out / "report.json").read_text())
    assert report["documents"] == 61 and report["kept"] == len(kept) == 61 - len(dups)
    assert report["removed"]["duplicate_exact"] >= 1
    assert report["skipped"]["counts"] == {"invalid_json": 1, "missing_field_text": 1}
    assert report["skipped"]["examples"]["invalid_json"] == [f"{first}:31"]
    assert report["cluster_sizes"]["duplicate_exact"]["2"] >= 1 and report["docs_per_s"] > 0
    # a rerun with one input replaces the outputs and drops the stale second shard
    assert main(["dedup", second, "-o", str(out)]) == 0
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == [
        "duplicates.jsonl", "kept-00000.jsonl", "report.json"]
    assert read_jsonl(out / "kept-00000.jsonl") == records[30:]  # id 1000 has no earlier copy now


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "1.5"], "--threshold must be in (0, 1), got 1.5"),
    (["--threshold", "0"], "--threshold must be in (0, 1)"),
    (["--num-perm", "0"], "--num-perm must be >= 1, got 0"),
    (["--bands", "20", "--rows", "8"], "--bands x --rows = 160 exceeds --num-perm = 128"),
    (["--bands", "20"], "--rows must be given together with --bands"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b c"}])
    assert main(["dedup", path, "-o", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_bad_inputs_name_the_file(tmp_path, capsys):
    wrong = tmp_path / "in.txt"
    wrong.write_text("x")
    assert main(["dedup", str(tmp_path / "missing.jsonl"), str(wrong), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing.jsonl" in err and "in.txt" in err and "is not a supported file" in err
    proc = subprocess.run([sys.executable, "-m", "gptforge.launcher.cli", "dedup", str(wrong), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: INPUT" in proc.stderr and "Traceback" not in proc.stderr
