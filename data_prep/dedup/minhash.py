"""MinHash signatures of word n-gram sets, LSH banding and candidate links, vectorised with numpy.

Pipeline for a batch of documents (all documents at once, so numpy's per-call cost is paid per batch):

1. each word is hashed once (its 8-byte chunks folded by multiply-xorshift rounds, vectorised over all
   the batch's words), giving one uint64 array for the whole batch;
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
# Odd multiplier of the per-chunk round of the word hash (the golden-ratio constant).
_BYTE_MUL = np.uint64(0x9E3779B97F4A7C15)
# Shingles per [num_perm, block] matrix: 8192 x 128 x 4 bytes = 4 MiB. Measured on a 2-core EPYC VM,
# 8192 took ~30% less time than 4096 (per-block Python and reduceat overhead) and than 32768 (out of cache).
_BLOCK = 8192


def optimal_bands_rows(threshold: float, num_perm: int, *, false_positive_weight: float = 0.5,
                       false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted S-curve error area: the area
    under P(candidate | s) = 1 - (1 - s^rows)^bands below ``threshold`` (false positives) plus the area
    above it under 1 - P (false negatives), by the trapezoid rule on 1001 points each. Ties go to the
    first in (bands, rows) order (fewest bands), so the choice is deterministic.

    All shapes are scored in one numpy expression: a Python loop scoring one shape at a time cost ~45 ms
    at num_perm 128, a visible share of a small run's clustering phase."""
    shapes = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)],
                      dtype=np.float64)  # [n_shapes, 2] in (bands, rows) order
    bands, rows = shapes[:, :1], shapes[:, 1:].astype(np.int64)[:, 0]  # [n_shapes, 1], [n_shapes]
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    # s^rows has only num_perm distinct exponents: one [num_perm, grid] table, gathered per shape
    exponents = np.arange(num_perm + 1, dtype=np.float64)[:, None]  # [num_perm + 1, 1]
    fp = np.trapezoid(1.0 - (1.0 - (below**exponents)[rows]) ** bands, below, axis=1)  # [n_shapes]
    fn = np.trapezoid((1.0 - (above**exponents)[rows]) ** bands, above, axis=1)  # [n_shapes]
    best = int(np.argmin(false_positive_weight * fp + false_negative_weight * fn))  # first minimum
    return int(shapes[best, 0]), int(shapes[best, 1])


@dataclass(kw_only=True, frozen=True)
class WordSpans:
    """Where the words of a batch of texts lie in one buffer (``split_words``)."""

    buffer: bytes
    """The texts joined by one space, then 8 zero bytes (so an 8-byte load at any word stays in bounds)."""
    starts: np.ndarray
    """[n_words] int64 offset of each word in ``buffer``, texts in order."""
    lengths: np.ndarray
    """[n_words] int64 bytes per word (>= 1)."""
    counts: np.ndarray
    """[n_docs] int64 words per text."""


def split_words(texts: list[bytes]) -> WordSpans:
    """The words of ``texts``: the maximal runs of bytes other than the ASCII space (byte 32).

    For ``normalize_text`` output (single spaces, no other whitespace) these are its words; a text whose
    only whitespace bytes are spaces, in runs or at its ends, gives the words its ``normalize_text``
    would, which lets ``compute_signatures`` skip the per-document split and join of ASCII texts."""
    text_bytes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))  # [n_docs]
    buffer = b" ".join([*texts, bytes(8)])
    data = np.frombuffer(buffer, dtype=np.uint8)[:len(buffer) - 9]  # [n_bytes] the texts, space-separated
    space = np.empty(len(data) + 2, dtype=bool)  # [n_bytes + 2] spaces, with one before and after
    space[0] = space[-1] = True
    np.equal(data, 32, out=space[1:-1])
    # offsets where space-ness changes: a word start, then one past its end, alternately
    edges = np.flatnonzero(space[1:] != space[:-1])
    starts, ends = edges[0::2], edges[1::2]
    # words per text: word starts inside each text's byte range [offset, offset + text_bytes)
    text_offsets = np.cumsum(text_bytes + 1) - text_bytes - 1  # [n_docs]
    counts = np.diff(np.searchsorted(starts, np.append(text_offsets, len(data) + 1)))  # [n_docs]
    return WordSpans(buffer=buffer, starts=starts, lengths=ends - starts, counts=counts)


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

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._mul = (rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32)
                     | np.uint32(1))[:, None]
        self._add = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        self._gram_mul = rng.integers(0, 1 << 63, self.ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def word_hashes(self, texts: list[bytes] | WordSpans) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the words of a batch (see ``split_words``): ([n_words] uint64 back to back,
        [n_docs] int64 words per text).

        Vectorised over words, not bytes: every word is read as 8-byte little-endian chunks (unaligned
        loads from a stride-1 uint64 view of the batch's bytes), the bytes past its end masked off, and
        the chunks folded with a multiply-xorshift round each. Most words fit one or two chunks, so the
        cost is a few numpy passes over [n_words]. Hashing only the distinct words would need them
        deduplicated first, and ``np.unique`` of 1.8M uint64 alone takes ~0.4 s, several times the
        whole word hash."""
        spans = texts if isinstance(texts, WordSpans) else split_words(texts)
        starts, lengths = spans.starts, spans.lengths
        # [n_bytes + 1] uint64: element i holds bytes i .. i+7 (little-endian, unaligned)
        chunks = np.ndarray((len(spans.buffer) - 7,), dtype="<u8", buffer=spans.buffer, strides=(1,))
        with np.errstate(over="ignore"):  # multiplications wrap mod 2^64 on purpose
            # the length separates words that differ only by trailing zero bytes
            words = lengths.astype(np.uint64) * _FINAL_MUL_2  # [n_words]
            words ^= chunks[starts] & _chunk_masks(lengths)
            words *= _BYTE_MUL
            words ^= words >> np.uint64(29)
            todo = np.flatnonzero(lengths > 8)  # words with bytes left at offset 8 * k
            for k in range(1, int(lengths.max(initial=0) + 7) // 8):
                todo = todo[lengths[todo] > 8 * k]
                chunk = chunks[starts[todo] + 8 * k] & _chunk_masks(lengths[todo] - 8 * k)
                mixed = (words[todo] ^ chunk) * _BYTE_MUL
                words[todo] = mixed ^ (mixed >> np.uint64(29))
            words ^= words >> np.uint64(31)
            words *= _FINAL_MUL_1
            words ^= words >> np.uint64(29)
        return words, spans.counts

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
            acc = word_hashes[:n_full] * self._gram_mul[0]  # [n_full] hash of the n-gram at every word offset
            term = np.empty_like(acc)
            for k in range(1, n):
                acc += np.multiply(word_hashes[k:k + n_full], self._gram_mul[k], out=term)
            # n-grams that lie inside one document start at its offsets start .. start + count - n: drop
            # the (at most n - 1) offsets before each document's end, a few per document, instead of
            # gathering the kept offsets (a pass over [n_shingles] int64 index arrays more)
            valid = np.ones(n_full, dtype=bool)  # [n_full]
            ends = starts + counts  # [n_docs] one past each document's last word
            for j in range(1, n):
                valid[(ends - j)[(counts >= j) & (ends - j < n_full)]] = False
            grams = acc[valid]  # [n_shingles_full]
            full_counts = np.maximum(counts - n + 1, 0)  # [n_docs]
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
        counts = np.asarray(shingle_counts, dtype=np.int64)  # [n_docs]
        out = np.full((len(counts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)  # [n_docs, num_perm]
        nonempty = np.flatnonzero(counts > 0)  # [m]
        ends = np.cumsum(counts)[nonempty]  # [m] one past each document's last shingle
        begins = ends - counts[nonempty]  # [m]
        mins = np.full((self.num_perm, len(nonempty)), np.iinfo(np.uint32).max, dtype=np.uint32)  # [num_perm, m]
        buf = np.empty((self.num_perm, _BLOCK), dtype=np.uint32)  # [num_perm, block]
        for lo in range(0, len(shingles), _BLOCK):
            block = shingles[lo:lo + _BLOCK]
            hashed = buf[:, :len(block)]
            # uint32 arithmetic wraps mod 2^32: h_k(x) = a_k * x + b_k
            np.multiply(self._mul, block[None, :], out=hashed)
            np.add(hashed, self._add, out=hashed)
            # documents [first, last) of the non-empty ones overlap this block, contiguously
            first = int(np.searchsorted(ends, lo, side="right"))
            last = int(np.searchsorted(begins, lo + len(block), side="left"))
            seg = np.maximum(begins[first:last] - lo, 0)  # [last - first] segment starts in the block
            # a document cut by a block boundary appears in two blocks: keep the smaller minimum
            np.minimum(mins[:, first:last], np.minimum.reduceat(hashed, seg, axis=1), out=mins[:, first:last])
        out[nonempty] = mins.T
        return out

    def batch(self, texts: list[bytes] | WordSpans) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of a batch of texts (``split_words``): ([n_docs, num_perm] uint32, [n_docs] bool
        has_shingles)."""
        shingles, shingle_counts = self.shingle_hashes(*self.word_hashes(texts))
        return self.signatures(shingles, shingle_counts), shingle_counts > 0


def _chunk_masks(remaining: np.ndarray) -> np.ndarray:
    """[n] uint64 masks keeping the first min(remaining, 8) bytes of a little-endian 8-byte chunk
    (a lookup, cheaper than computing the shift per word)."""
    masks = np.array([(1 << (8 * size)) - 1 for size in range(9)], dtype=np.uint64)  # [9]
    return masks[np.minimum(remaining, 8)]


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


def connected_min_labels(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Union-find over ``n`` nodes and the edges (left[k], right[k]), vectorised: [n] int64, the smallest
    node of each node's connected component (hooking every root to the smaller root of its edges, then
    pointer jumping, until no label changes)."""
    labels = np.arange(n, dtype=np.int64)  # [n]
    while len(left):
        root_l, root_r = labels[left], labels[right]
        low = np.minimum(root_l, root_r)
        hooked = labels.copy()
        np.minimum.at(hooked, root_l, low)
        np.minimum.at(hooked, root_r, low)
        while True:  # pointer jumping: every node points at its root
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, labels):
            break
        labels = hooked
    return labels


def lsh_links(signatures: np.ndarray, bands: int, rows: int, threshold: float | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Edges between documents sharing a band (verified when ``threshold`` is given).

    A bucket whose members all pass against its first member is linked as a star (same components as
    all pairs); a bucket with a failing member is verified pair by pair. Returns (left, right,
    candidate pairs, rejected pairs)."""
    keys = band_hashes(signatures, bands, rows)  # [n_docs, bands] uint64
    min_equal = -1 if threshold is None else threshold * signatures.shape[1] - 1e-9
    left, right = [], []
    candidates = rejected = 0
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")  # equal keys keep input order
        sorted_keys = keys[order, band]
        new = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
        run_start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
        member = np.flatnonzero(~new)
        first, other = order[run_start[member]], order[member]
        candidates += len(member)
        equal = (signatures[first] == signatures[other]).sum(axis=1)  # [n_pairs]
        passed = equal >= min_equal
        left.append(first[passed])
        right.append(other[passed])
        for run in np.unique(run_start[member[~passed]]):  # buckets with a failing member: all pairs
            end = run + 1
            while end < len(order) and not new[end]:
                end += 1
            docs = order[run:end]
            for a in range(1, len(docs)):
                equal = (signatures[docs[:a]] == signatures[docs[a]]).sum(axis=1)
                linked = docs[:a][equal >= min_equal]
                left.append(linked)
                right.append(np.full(len(linked), docs[a]))
            rejected += int((~passed[run_start[member] == run]).sum())
    if not left:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), candidates, rejected
    return np.concatenate(left), np.concatenate(right), candidates, rejected
