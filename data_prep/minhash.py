"""MinHash signatures of word n-gram sets and LSH banding, vectorised with numpy.

Pipeline for a batch of documents (all documents at once, so numpy's per-call cost is paid per batch):

1. each word is hashed once (a polynomial hash over the batch's bytes, vectorised), giving one uint64
   array for the whole batch;
2. the hash of the n-gram starting at word i combines the word hashes i..i+n-1 with fixed odd
   multipliers (a polynomial hash mod 2^64) and a murmur-style finaliser, keeping the top 32 bits;
3. ``num_perm`` hash functions h_k(x) = (a_k * x + b_k) mod 2^32 (odd a_k, so each is a bijection of
   the 32-bit values, i.e. a permutation) are applied to all shingles at once as a ``[num_perm, block]``
   matrix, and ``np.minimum.reduceat`` takes the minimum per document along the contiguous axis;
4. band hashes: each band of ``rows`` signature values is folded into one uint64.

A document with fewer words than ``ngram`` has one shingle (all its words); a document with no words
has no shingles and no signature (``has_shingles`` False): it cannot be a fuzzy duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Odd 64-bit constants (from the splitmix64 / murmur3 finalisers) for the polynomial n-gram hash.
_FINAL_MUL_1 = np.uint64(0xFF51AFD7ED558CCD)
_FINAL_MUL_2 = np.uint64(0xC4CEB9FE1A85EC53)
# Odd multiplier of the polynomial byte hash of words, and its inverse mod 2^64.
_BYTE_MUL = np.uint64(0x9E3779B97F4A7C15)
_BYTE_MUL_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
# Shingles per [num_perm, block] matrix: 4096 x 128 x 4 bytes = 2 MiB stays in cache on common CPUs.
_BLOCK = 4096


def lsh_error_area(threshold: float, bands: int, rows: int, *, false_positive_weight: float = 0.5,
                   false_negative_weight: float = 0.5, grid: int = 1001) -> float:
    """Weighted area under the S-curve P(candidate | s) = 1 - (1 - s^rows)^bands below ``threshold``
    (false positives) plus the area above it under 1 - P (false negatives), by the trapezoid rule."""
    below = np.linspace(0.0, threshold, grid)
    above = np.linspace(threshold, 1.0, grid)
    fp = np.trapezoid(1.0 - (1.0 - below**rows) ** bands, below)
    fn = np.trapezoid((1.0 - above**rows) ** bands, above)
    return float(false_positive_weight * fp + false_negative_weight * fn)


def optimal_bands_rows(threshold: float, num_perm: int, *, false_positive_weight: float = 0.5,
                       false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising ``lsh_error_area``; ties go to the first
    found (fewest bands), so the choice is deterministic."""
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            error = lsh_error_area(threshold, bands, rows, false_positive_weight=false_positive_weight,
                                   false_negative_weight=false_negative_weight)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """P(two documents of Jaccard ``similarity`` share at least one band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@dataclass(kw_only=True)
class MinHasher:
    """The hash functions of one signature layout; equal (num_perm, ngram, seed) give equal signatures."""

    num_perm: int = 128
    """Number of hash functions (signature length)."""
    ngram: int = 5
    """Words per shingle."""
    seed: int = 1
    """Seed of the hash-function parameters: signatures are comparable only under the same seed."""
    _mul: np.ndarray = field(init=False, repr=False)  # [num_perm, 1] uint32, odd
    _add: np.ndarray = field(init=False, repr=False)  # [num_perm, 1] uint32
    _gram_mul: np.ndarray = field(init=False, repr=False)  # [ngram] uint64, odd
    _powers: np.ndarray = field(init=False, repr=False)  # [n] uint64 P^i, grown on demand
    _inverse: np.ndarray = field(init=False, repr=False)  # [n] uint64 P^-i, grown on demand

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._mul = (rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32)
                     | np.uint32(1))[:, None]
        self._add = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        self._powers = self._inverse = np.ones(0, dtype=np.uint64)
        self._gram_mul = rng.integers(0, 1 << 63, self.ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def word_hashes(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the words of texts whose words are separated by single spaces (``normalize_text``):
        ([n_words] uint64 back to back, [n_docs] int64 words per text).

        Vectorised over the batch's bytes instead of one Python call per word: with prefix sums
        S[i] = sum_{j<i} byte_j * P^j (mod 2^64), the polynomial hash of bytes [s, e) is
        (S[e] - S[s]) * P^-s (P odd, so invertible mod 2^64), mixed with the word length."""
        counts = np.fromiter((text.count(b" ") + 1 if text else 0 for text in texts), dtype=np.int64,
                             count=len(texts))
        data = np.frombuffer(b" ".join(texts), dtype=np.uint8)  # [n_bytes]
        spaces = np.flatnonzero(data == 32)
        starts = np.concatenate(([0], spaces + 1))  # [n_words + empty] word starts
        ends = np.concatenate((spaces, [len(data)]))
        nonempty = ends > starts  # an empty text leaves an empty "word" between two separators
        starts, ends = starts[nonempty], ends[nonempty]
        with np.errstate(over="ignore"):
            powers, inverse = self._power_tables(len(data) + 1)
            prefix = np.zeros(len(data) + 1, dtype=np.uint64)  # [n_bytes + 1]
            np.cumsum(data * powers[:-1], out=prefix[1:])
            words = (prefix[ends] - prefix[starts]) * inverse[starts]
            words += (ends - starts).astype(np.uint64) * _FINAL_MUL_2
            words ^= words >> np.uint64(31)
            words *= _FINAL_MUL_1
            words ^= words >> np.uint64(29)
        return words, counts

    def _power_tables(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """([size] P^i, [size] P^-i) mod 2^64, computed once and grown by doubling: a cumulative product
        per batch would cost as much as the hashing itself."""
        if len(self._powers) < size:
            grown = max(size, 2 * len(self._powers))
            with np.errstate(over="ignore"):
                self._powers = np.cumprod(np.full(grown, _BYTE_MUL, dtype=np.uint64)) * _BYTE_MUL_INV
                self._inverse = np.cumprod(np.full(grown, _BYTE_MUL_INV, dtype=np.uint64)) * _BYTE_MUL
        return self._powers[:size], self._inverse[:size]

    def shingle_hashes(self, word_hashes: np.ndarray, word_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of a batch whose documents' words are concatenated in ``word_hashes``.

        Returns (hashes ``[n_shingles]`` uint32, shingle counts per document ``[n_docs]`` int64); the
        shingles of document d are contiguous and in document order."""
        counts = np.asarray(word_counts, dtype=np.int64)  # [n_docs]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))  # [n_docs] first word of each document
        n = self.ngram
        total = len(word_hashes)
        with np.errstate(over="ignore"):  # the polynomial hash wraps mod 2^64 on purpose
            n_full = max(total - n + 1, 0)
            acc = np.zeros(n_full, dtype=np.uint64)  # [n_full] hash of the n-gram at every word offset
            for k in range(n):
                acc += word_hashes[k:k + n_full] * self._gram_mul[k]
            # n-grams that lie inside one document: offsets start .. start + count - n
            full_counts = np.maximum(counts - n + 1, 0)  # [n_docs]
            keep = np.repeat(starts, full_counts) + _ranges(full_counts)  # [n_shingles_full] word offsets
            grams = acc[keep]
            short = np.flatnonzero((counts > 0) & (counts < n))  # documents that get one whole-text shingle
            shingle_counts = np.where(counts >= n, full_counts, (counts > 0).astype(np.int64))
            if len(short):
                short_hashes = np.zeros(len(short), dtype=np.uint64)
                for k in range(n - 1):
                    has_word = counts[short] > k
                    idx = starts[short] + np.minimum(k, counts[short] - 1)
                    short_hashes += np.where(has_word, word_hashes[idx] * self._gram_mul[k], np.uint64(0))
                # merge in document order: position of each document's first shingle in the output
                out_starts = np.concatenate(([0], np.cumsum(shingle_counts)[:-1]))
                merged = np.empty(int(shingle_counts.sum()), dtype=np.uint64)
                is_short = np.zeros(len(merged), dtype=bool)
                is_short[out_starts[short]] = True
                merged[is_short] = short_hashes
                merged[~is_short] = grams
                grams = merged
            grams ^= grams >> np.uint64(33)
            grams *= _FINAL_MUL_1
            grams ^= grams >> np.uint64(33)
            grams *= _FINAL_MUL_2
            grams ^= grams >> np.uint64(33)
        return (grams >> np.uint64(32)).astype(np.uint32), shingle_counts

    def signatures(self, shingles: np.ndarray, shingle_counts: np.ndarray) -> np.ndarray:
        """[n_docs, num_perm] uint32 MinHash signatures; a document without shingles gets all 2^32-1.

        ``shingles`` ``[n_shingles]`` uint32 holds the documents' shingles back to back."""
        counts = np.asarray(shingle_counts, dtype=np.int64)
        n_docs = len(counts)
        out = np.full((self.num_perm, n_docs), np.iinfo(np.uint32).max, dtype=np.uint32)  # [num_perm, n_docs]
        doc_of = np.repeat(np.arange(n_docs), counts)  # [n_shingles] owning document of each shingle
        buf = np.empty((self.num_perm, _BLOCK), dtype=np.uint32)  # [num_perm, block]
        for lo in range(0, len(shingles), _BLOCK):
            block = shingles[lo:lo + _BLOCK]
            hashed = buf[:, :len(block)]
            # uint32 arithmetic wraps mod 2^32: h_k(x) = a_k * x + b_k
            np.multiply(self._mul, block[None, :], out=hashed)
            np.add(hashed, self._add, out=hashed)
            owners = doc_of[lo:lo + _BLOCK]
            seg = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))  # segment starts
            mins = np.minimum.reduceat(hashed, seg, axis=1)  # [num_perm, n_segments]
            # a document cut by a block boundary appears in two blocks: keep the smaller minimum
            docs = owners[seg]
            out[:, docs] = np.minimum(out[:, docs], mins)
        return np.ascontiguousarray(out.T)

    def batch(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of a batch of normalised texts: ([n_docs, num_perm] uint32, [n_docs] bool has_shingles)."""
        shingles, shingle_counts = self.shingle_hashes(*self.word_hashes(texts))
        return self.signatures(shingles, shingle_counts), shingle_counts > 0


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(c) for every c in ``counts`` (vectorised)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    offsets = np.repeat(ends - counts, counts)  # [total] start of the run each element belongs to
    return np.arange(total, dtype=np.int64) - offsets


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n_docs, bands] uint64: band i folds signature columns i*rows .. (i+1)*rows-1 into one hash
    (equal bands give equal hashes; different bands collide with probability about 2^-64)."""
    n_docs = signatures.shape[0]
    out = np.zeros((n_docs, bands), dtype=np.uint64)  # [n_docs, bands]
    cols = signatures[:, :bands * rows].reshape(n_docs, bands, rows).astype(np.uint64)  # [n_docs, bands, rows]
    with np.errstate(over="ignore"):
        for j in range(rows):
            out *= _FINAL_MUL_1
            out += cols[:, :, j] + np.uint64(1)
        out ^= out >> np.uint64(29)
        out *= _FINAL_MUL_2
        out ^= out >> np.uint64(32)
    return out


def shingle_set_hashes(hasher: MinHasher, text: bytes) -> set[int]:
    """The set of 32-bit shingle hashes of one normalised text (exact Jaccard checks in tests)."""
    shingles, _ = hasher.shingle_hashes(*hasher.word_hashes([text]))
    return set(shingles.tolist())
