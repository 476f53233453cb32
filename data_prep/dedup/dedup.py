"""Document deduplication in three phases with files in between (so a cluster can run them as array jobs).

1. ``compute_signatures`` (one job per input shard): URL key, exact-text key and MinHash signature of
   every valid record -> one ``.npz`` signature file, written atomically;
2. ``cluster_signatures`` (one job): all signature files -> one ``.npz`` removal file naming, for every
   removed document, its shard, position, reason and survivor;
3. ``write_kept`` (one job per input shard): the shard and the removal file -> the kept records as JSONL.

Only signatures and hashes are held in memory, never the texts (phases 1 and 3 stream the shard).

Order and survivors: documents are ordered by shard (the order of the signature files) then position
(the n-th valid record of its shard). Dedup kinds run in turn, each over the documents the previous
kinds kept: URL (``duplicate_url``), then exact text (``duplicate_exact``), then fuzzy
(``duplicate_fuzzy``). The survivor of every group or cluster is its first document in that order, so a
rerun, with any number of workers, removes the same documents and names the same survivors.

Fuzzy dedup: documents sharing an LSH band are candidate pairs; with ``verify`` a pair is linked only if
the fraction of equal signature values (the MinHash estimate of their Jaccard) is >= ``threshold``, which
drops band collisions of dissimilar documents. Clusters are the connected components of the links, so a
chain A~B~C is one cluster even when A and C are less similar than the threshold.
"""

from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import xxhash

from ...common.atomic import atomic_write_bytes, atomic_writer
from ..readers.documents import SkipLog, iter_records
from .minhash import (MinHasher, WordSpans, connected_min_labels, lsh_links,
                                        optimal_bands_rows, split_words)
from ..readers.web_document import content_id

REASONS = ("duplicate_url", "duplicate_exact", "duplicate_fuzzy")
# Layout of the hashes in signature files; bumped whenever they change for equal inputs, so that phase 2
# refuses to mix files from before and after (e.g. a corpus build resumed across an upgrade).
SIGNATURE_VERSION = 2
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "ws": 80, "wss": 443}
_MASK64 = (1 << 64) - 1


@dataclass(kw_only=True)
class DedupConfig:
    """What to deduplicate and how; phases 1-3 of one run must get equal configs."""

    text_field: str = "text"
    """Record field holding the document text (records without a string there are counted skips)."""
    id_field: str = "id"
    """Record field holding the document id written to duplicates; missing -> ``content_id(text)``."""
    url_field: str = "url"
    """Record field holding the document URL; records without a non-empty string there skip URL dedup."""
    url: bool = True
    """URL dedup on the normalised URL (see ``normalize_url``)."""
    exact: bool = True
    """Exact dedup on the xxh3-128 hash of the normalised text (see ``normalize_text``)."""
    fuzzy: bool = True
    """Fuzzy dedup with MinHash LSH over word n-gram shingles of the normalised text."""
    threshold: float = 0.8
    """Jaccard similarity of shingle sets at which documents count as near-duplicates, in (0, 1)."""
    num_perm: int = 128
    """MinHash hash functions per signature."""
    ngram: int = 5
    """Words per shingle."""
    bands: int | None = None
    """LSH bands; None: chosen with ``rows`` by ``optimal_bands_rows`` for ``threshold``."""
    rows: int | None = None
    """Signature values per band; give both ``bands`` and ``rows`` or neither (bands * rows <= num_perm)."""
    false_positive_weight: float = 0.1
    """Weight of the false-positive area of the S-curve when choosing bands and rows. Low by default:
    with ``verify`` a false-positive candidate costs one signature comparison, not precision."""
    false_negative_weight: float = 0.9
    """Weight of the false-negative area of the S-curve when choosing bands and rows. High by default,
    since a missed candidate is a missed duplicate: at threshold 0.8 and 128 permutations, 0.1 / 0.9
    give 14 bands x 9 rows, which make a pair of Jaccard 0.85 a candidate with probability 0.975
    (0.5 / 0.5 give 9 x 13: 0.69), at 0.027 for Jaccard 0.5 (9 x 13: 0.001)."""
    verify: bool = True
    """Link an LSH candidate pair only if its estimated Jaccard is >= threshold (better precision)."""
    seed: int = 1
    """Seed of the MinHash functions: signature files are comparable only under the same seed."""
    batch_docs: int = 1024
    """At most this many documents per numpy hashing batch in phase 1."""
    batch_bytes: int = 1 << 19
    """A phase-1 batch is hashed once its texts reach this many bytes (or ``batch_docs`` documents).
    Larger batches make fewer numpy calls, but their temporaries grow past what the C allocator keeps
    for reuse, and faulting in fresh pages then costs more than the calls saved (measured: 4,600
    documents hashed in 0.11 s CPU with 256 KiB-1 MiB batches, 0.19 s with 2 MiB ones)."""

    def errors(self, names: dict[str, str] | None = None) -> list[str]:
        """Every invalid field, each message starting with its name (``names`` maps field -> flag)."""
        name = (names or {}).get
        errors = []

        def bad(key: str, message: str) -> None:
            errors.append(f"{name(key, key)} {message}")

        if not 0.0 < self.threshold < 1.0:
            bad("threshold", f"must be in (0, 1), got {self.threshold}")
        for key in ("num_perm", "ngram", "batch_docs", "batch_bytes"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if (self.bands is None) != (self.rows is None):
            missing, given = ("bands", "rows") if self.bands is None else ("rows", "bands")
            bad(missing, f"must be given together with {name(given, given)}")
        elif self.bands is not None:
            if self.bands < 1 or self.rows < 1:
                bad("bands", f"and {name('rows', 'rows')} must be >= 1, got {self.bands} and {self.rows}")
            elif self.bands * self.rows > self.num_perm:
                bad("bands", f"x {name('rows', 'rows')} = {self.bands * self.rows} exceeds "
                    f"{name('num_perm', 'num_perm')} = {self.num_perm}")
        for key in ("false_positive_weight", "false_negative_weight"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not (self.url or self.exact or self.fuzzy):
            errors.append("every dedup kind is disabled (url, exact, fuzzy): nothing to do")
        return errors

    def check(self) -> None:
        """Raise ValueError listing every invalid field."""
        errors = self.errors()
        if errors:
            raise ValueError("; ".join(errors))

    def batch_full(self, docs: int, text_bytes: int) -> bool:
        """Whether a phase-1 batch of ``docs`` texts holding ``text_bytes`` bytes is to be hashed now."""
        return docs >= self.batch_docs or text_bytes >= self.batch_bytes

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows): the explicit ones, else those minimising the weighted S-curve error area."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return optimal_bands_rows(self.threshold, self.num_perm, false_positive_weight=self.false_positive_weight,
                                  false_negative_weight=self.false_negative_weight)


def normalize_url(url: str) -> str:
    """The URL dedup key. Rules: surrounding whitespace stripped; scheme and host lowercased; the default
    port of the scheme (http 80, https 443, ftp 21, ws 80, wss 443) dropped; the fragment dropped;
    trailing slashes of the path dropped (``http://a.org/`` == ``http://a.org``); query parameters
    decoded, sorted by name then value and re-encoded (blank values kept). The path keeps its case."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a non-numeric or out-of-range port: keep the netloc as written (lowercased)
        host, port = None, None
    if host is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
        netloc = (f"{userinfo}@" if userinfo else "") + host
        if port is not None and _DEFAULT_PORTS.get(scheme) != port:
            netloc += f":{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), query, ""))


def normalize_text(text: str) -> bytes:
    """The exact-dedup key text and the fuzzy shingle source: NFKC, lowercase, whitespace runs -> one
    space, stripped; UTF-8. Its space-separated words are the words of the shingles."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split()).encode("utf-8")


# ASCII whitespace of ``str.split`` (\t \n \v \f \r and the separators 0x1c-0x1f) -> space
_ASCII_SPACES = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)


def prenormalize_text(text: str) -> bytes:
    """``normalize_text`` but for its whitespace collapse, which ``split_words`` makes unnecessary: the
    same words (maximal runs of non-space bytes). For an ASCII text (most of a web corpus), NFKC and
    lowercase, then its whitespace bytes become spaces in one ``bytes.translate``; the per-word split
    and join of ``normalize_text`` cost ~19 us per 400-word document, a third of phase 1's work after
    JSON parsing.
    Other texts get ``normalize_text`` itself (Unicode whitespace needs ``str.split``)."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    if lowered.isascii():
        return lowered.encode("ascii").translate(_ASCII_SPACES)
    return " ".join(lowered.split()).encode("utf-8")


def _exact_keys(spans: WordSpans) -> list[tuple[int, int]]:
    """The exact-dedup key of every text of a batch: the xxh3-128 of its ``normalize_text`` bytes, i.e.
    its words joined by single spaces, cut out of the batch buffer (the other spaces dropped)."""
    data = np.frombuffer(spans.buffer, dtype=np.uint8)  # [n_bytes + 9]
    keep = data != 32  # [n_bytes + 9] word bytes ...
    keep[len(data) - 8:] = False  # ... but the zero padding
    first = np.cumsum(spans.counts) - spans.counts  # [n_docs] index of each text's first word
    later = np.ones(len(spans.starts), dtype=bool)  # [n_words] words after their text's first
    later[first[spans.counts > 0]] = False
    keep[spans.starts[later] - 1] = True  # one space before each of them
    collapsed = memoryview(data[keep].tobytes())  # the normalised texts back to back
    word_bytes = np.concatenate(([0], np.cumsum(spans.lengths)))  # [n_words + 1]
    ends = np.cumsum(spans.counts)  # [n_docs] one past each text's last word
    sizes = word_bytes[ends] - word_bytes[first] + np.maximum(spans.counts - 1, 0)  # [n_docs] bytes
    offsets = np.concatenate(([0], np.cumsum(sizes))).tolist()
    return [_hash128(collapsed[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _hash128(data: bytes) -> tuple[int, int]:
    value = xxhash.xxh3_128_intdigest(data)
    return value >> 64, value & _MASK64


def _record_id(record: dict, config: DedupConfig) -> str:
    value = record.get(config.id_field)
    if value is None or isinstance(value, (dict, list)):
        return content_id(record[config.text_field])
    return str(value)


def _pack_strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as (UTF-8 blob [n_bytes] uint8, offsets [n + 1] int64): no pickled objects in .npz files."""
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(item) for item in encoded], dtype=np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_string(blob: np.ndarray, offsets: np.ndarray, index: int) -> str:
    return blob[offsets[index]:offsets[index + 1]].tobytes().decode("utf-8")


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass(kw_only=True)
class ShardSignatures:
    """What phase 1 did with one shard."""

    shard_path: str
    signature_path: str
    records: int
    skips: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0


def compute_signatures(shard_path: str, signature_path: str, config: DedupConfig) -> ShardSignatures:
    """Phase 1: read one JSONL/Parquet shard and write its signature file (``.npz``, atomically).

    The file holds, per valid record in shard order: its id, URL key (``has_url``, ``url_hash``
    [n, 2] uint64), exact key (``text_hash`` [n, 2] uint64), MinHash signature (``signatures``
    [n, num_perm] uint32, ``has_shingles``), plus a JSON ``meta`` (shard path, config, skips)."""
    start = time.perf_counter()
    hasher = MinHasher(num_perm=config.num_perm, ngram=config.ngram, seed=config.seed)
    skips = SkipLog()
    ids: list[str] = []
    has_url: list[bool] = []
    url_hash: list[tuple[int, int]] = []
    text_hash: list[tuple[int, int]] = []
    sig_parts: list[np.ndarray] = []  # [batch, num_perm] uint32 each
    shingled_parts: list[np.ndarray] = []  # [batch] bool each
    batch_texts: list[bytes] = []  # prenormalize_text of the batch being hashed
    batch_bytes = 0

    def flush() -> None:
        spans = split_words(batch_texts)
        if config.exact:
            text_hash.extend(_exact_keys(spans))
        if config.fuzzy:
            signatures, has_shingles = hasher.batch(spans)
            sig_parts.append(signatures)
            shingled_parts.append(has_shingles)
        batch_texts.clear()

    for record, _ in iter_records(shard_path, config.text_field, skips):
        ids.append(_record_id(record, config))
        url = record.get(config.url_field) if config.url else None
        has_url.append(isinstance(url, str) and bool(url.strip()))
        url_hash.append(_hash128(normalize_url(url).encode("utf-8")) if has_url[-1] else (0, 0))
        if config.exact or config.fuzzy:
            batch_texts.append(prenormalize_text(record[config.text_field]))
            batch_bytes += len(batch_texts[-1])
            if config.batch_full(len(batch_texts), batch_bytes):
                flush()
                batch_bytes = 0
    if batch_texts:
        flush()
    if not config.exact:
        text_hash = [(0, 0)] * len(ids)
    n = len(ids)
    perms = config.num_perm if config.fuzzy else 0
    id_blob, id_offsets = _pack_strings(ids)
    meta = {"shard_path": shard_path, "records": n, "config": asdict(config), "version": SIGNATURE_VERSION,
            "skips": {"counts": dict(skips.counts), "examples": skips.examples}}
    _save_npz(signature_path, {
        "id_blob": id_blob, "id_offsets": id_offsets,
        "has_url": np.array(has_url, dtype=bool),
        "url_hash": np.array(url_hash, dtype=np.uint64).reshape(n, 2),
        "text_hash": np.array(text_hash, dtype=np.uint64).reshape(n, 2),
        "signatures": np.concatenate(sig_parts) if sig_parts else np.zeros((n, perms), dtype=np.uint32),
        "has_shingles": np.concatenate(shingled_parts) if shingled_parts else np.zeros(n, dtype=bool),
        "meta": np.array(json.dumps(meta)),
    })
    return ShardSignatures(shard_path=shard_path, signature_path=signature_path, records=n, skips=skips,
                           seconds=time.perf_counter() - start)


def _group_first(hi: np.ndarray, lo: np.ndarray, members: np.ndarray) -> np.ndarray:
    """[m] for each of ``members`` (ascending global indices with 128-bit keys hi/lo): the first member
    with the same key."""
    order = np.lexsort((members, lo, hi))
    h, l = hi[order], lo[order]
    new = np.concatenate(([True], (h[1:] != h[:-1]) | (l[1:] != l[:-1])))  # [m] first of a key run
    run_start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    first = np.empty(len(order), dtype=np.int64)
    first[order] = members[order[run_start]]
    return first


def near_duplicate_labels(signatures: np.ndarray, config: DedupConfig,
                          shape: tuple[int, int] | None = None) -> tuple[np.ndarray, int, int]:
    """Fuzzy clusters of documents given their ``[m, num_perm]`` uint32 signatures (in input order):
    ([m] int64 index of the first document of each document's cluster, candidate pairs, rejected
    pairs). ``shape`` is (bands, rows) when the caller already has ``config.lsh_shape()``."""
    bands, rows = shape or config.lsh_shape()
    left, right, candidates, rejected = lsh_links(signatures, bands, rows,
                                                   config.threshold if config.verify else None)
    return connected_min_labels(len(signatures), left, right), candidates, rejected


def _histogram(survivors: np.ndarray) -> dict[str, int]:
    """Cluster size -> number of clusters (sizes >= 2) from each removed document's survivor."""
    _, sizes = np.unique(survivors, return_counts=True)
    sizes, counts = np.unique(sizes + 1, return_counts=True)
    return {str(int(size)): int(count) for size, count in zip(sizes, counts)}


@dataclass(kw_only=True)
class ClusterSummary:
    """What phase 2 found: documents, removals per reason, cluster-size histograms per reason."""

    removal_path: str
    documents: int
    removed: dict[str, int]
    clusters: dict[str, dict[str, int]]
    bands: int
    rows: int
    candidate_pairs: int
    rejected_pairs: int
    seconds: float


def cluster_signatures(signature_paths: list[str], removal_path: str, config: DedupConfig) -> ClusterSummary:
    """Phase 2: read all signature files (their order is the input order) and write the removal file
    (``.npz``, atomically): per removed document, sorted by (shard, position): ``shard``, ``position``,
    ``reason`` (index into ``REASONS``), ``survivor_shard``, ``survivor_position``, removed and survivor
    ids (``removed_id_blob/offsets``, ``survivor_id_blob/offsets``), and a JSON ``meta``."""
    start = time.perf_counter()
    loaded = []
    for path in signature_paths:  # each npz[key] re-reads the archive: read every array once
        with np.load(path) as npz:
            loaded.append({key: npz[key] for key in npz.files})
    metas = [json.loads(str(npz["meta"])) for npz in loaded]
    layout = ("num_perm", "ngram", "seed", "text_field", "url", "exact", "fuzzy")
    for path, meta in zip(signature_paths, metas):
        if meta.get("version", 1) != SIGNATURE_VERSION:
            raise ValueError(f"{path}: signature file of layout version {meta.get('version', 1)}, this gptforge "
                             f"reads version {SIGNATURE_VERSION}: recompute it (phase 1)")
        for key in layout:
            if meta["config"][key] != getattr(config, key):
                raise ValueError(f"{path}: signature file made with {key}={meta['config'][key]!r}, "
                                 f"this run has {key}={getattr(config, key)!r}")
    counts = np.array([meta["records"] for meta in metas], dtype=np.int64)
    shard_of = np.repeat(np.arange(len(loaded)), counts)  # [n] shard of each document (global order)
    position_of = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # [n]
    n = len(shard_of)
    survivor = np.arange(n, dtype=np.int64)  # [n] global index of each document's survivor
    reason = np.full(n, -1, dtype=np.int8)  # [n] index into REASONS, -1 kept
    clusters: dict[str, dict[str, int]] = {}

    def apply(kind: int, members: np.ndarray, first: np.ndarray) -> None:
        gone = members != first
        survivor[members[gone]] = first[gone]
        reason[members[gone]] = kind
        clusters[REASONS[kind]] = _histogram(first[gone])

    if config.url:
        url_hash = np.concatenate([npz["url_hash"] for npz in loaded]).reshape(n, 2)  # [n, 2] uint64
        members = np.flatnonzero(np.concatenate([npz["has_url"] for npz in loaded]))
        apply(0, members, _group_first(url_hash[members, 0], url_hash[members, 1], members))
    if config.exact:
        text_hash = np.concatenate([npz["text_hash"] for npz in loaded]).reshape(n, 2)  # [n, 2] uint64
        members = np.flatnonzero(reason < 0)
        apply(1, members, _group_first(text_hash[members, 0], text_hash[members, 1], members))
    bands, rows = config.lsh_shape()
    candidates = rejected = 0
    if config.fuzzy:
        shingled = np.concatenate([npz["has_shingles"] for npz in loaded])
        members = np.flatnonzero((reason < 0) & shingled)  # ascending: local order is input order
        signatures = np.concatenate([npz["signatures"] for npz in loaded])[members]  # [m, num_perm] uint32
        labels, candidates, rejected = near_duplicate_labels(signatures, config, (bands, rows))
        apply(2, members, members[labels])
    removed = np.flatnonzero(reason >= 0)  # ascending global index = (shard, position) order
    id_blob = np.concatenate([npz["id_blob"] for npz in loaded])
    id_offsets = np.concatenate([[0]] + [npz["id_offsets"][1:] + base for npz, base in zip(
        loaded, np.cumsum([0] + [len(npz["id_blob"]) for npz in loaded])[:-1])])
    removed_ids = _pack_strings([_unpack_string(id_blob, id_offsets, g) for g in removed])
    survivor_ids = _pack_strings([_unpack_string(id_blob, id_offsets, g) for g in survivor[removed]])
    summary = ClusterSummary(
        removal_path=removal_path, documents=n,
        removed={name: int((reason == kind).sum()) for kind, name in enumerate(REASONS)},
        clusters=clusters, bands=bands, rows=rows, candidate_pairs=candidates, rejected_pairs=rejected,
        seconds=time.perf_counter() - start)
    meta = {"shards": [{"path": m["shard_path"], "records": m["records"]} for m in metas],
            "reasons": list(REASONS), "summary": asdict(summary)}
    _save_npz(removal_path, {
        "shard": shard_of[removed].astype(np.int32), "position": position_of[removed],
        "reason": reason[removed].astype(np.uint8),
        "survivor_shard": shard_of[survivor[removed]].astype(np.int32),
        "survivor_position": position_of[survivor[removed]],
        "removed_id_blob": removed_ids[0], "removed_id_offsets": removed_ids[1],
        "survivor_id_blob": survivor_ids[0], "survivor_id_offsets": survivor_ids[1],
        "meta": np.array(json.dumps(meta)),
    })
    return summary


def write_kept(shard_path: str, shard_index: int, removal_path: str, out_path: str, config: DedupConfig) -> int:
    """Phase 3: stream shard ``shard_index`` (its position among the signature files given to phase 2)
    and write its kept records, fields unchanged, as JSONL to ``out_path`` (atomically). Values JSON
    cannot hold (Parquet timestamps, bytes) are written as their ``str``. Returns the kept count."""
    with np.load(removal_path) as removal:
        meta = json.loads(str(removal["meta"]))
        expected = meta["shards"][shard_index]["records"]
        drop = np.zeros(expected, dtype=bool)  # [records] True for removed positions
        drop[removal["position"][removal["shard"] == shard_index]] = True
    kept = seen = 0
    with atomic_writer(out_path, "w") as handle:
        for record, where in iter_records(shard_path, config.text_field, SkipLog()):
            if seen >= expected:
                raise ValueError(f"{shard_path}: more records than when its signatures were computed "
                                 f"({expected}); the shard changed ({where})")
            if not drop[seen]:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                kept += 1
            seen += 1
        if seen != expected:
            raise ValueError(f"{shard_path}: {seen} records, {expected} when its signatures were "
                             "computed; the shard changed")
    return kept


def write_duplicates(removal_path: str, out_path: str) -> int:
    """``duplicates.jsonl`` from a removal file: ``{"id", "duplicate_of", "reason"}`` per removed
    document in (shard, position) order, atomically. Returns the number of lines."""
    with np.load(removal_path) as npz:  # each npz[key] re-reads the archive: read every array once
        removal = {key: npz[key] for key in npz.files}
    reasons = removal["reason"]
    with atomic_writer(out_path, "w") as handle:
        for k in range(len(reasons)):
            handle.write(json.dumps({
                "id": _unpack_string(removal["removed_id_blob"], removal["removed_id_offsets"], k),
                "duplicate_of": _unpack_string(removal["survivor_id_blob"], removal["survivor_id_offsets"], k),
                "reason": REASONS[int(reasons[k])]}, ensure_ascii=False) + "\n")
    return len(reasons)


def config_flag_names() -> dict[str, str]:
    """Config field -> CLI flag (``num_perm`` -> ``--num-perm``), for error messages."""
    return {f.name: "--" + f.name.replace("_", "-") for f in fields(DedupConfig)}
