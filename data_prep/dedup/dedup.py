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
from dataclasses import asdict, dataclass, field

import numpy as np

from ...common.atomic import atomic_write_bytes, atomic_writer
from ..readers.documents import SkipLog, iter_records
# DedupConfig, config_flag_names and normalize_text are imported from here by the dedup CLI and bench/.
from .config import DedupConfig, config_flag_names  # noqa: F401
from .keys import exact_keys, hash128, normalize_text, normalize_url, prenormalize_text, record_id  # noqa: F401
from .minhash import MinHasher, connected_min_labels, lsh_links, split_words

REASONS = ("duplicate_url", "duplicate_exact", "duplicate_fuzzy")
# Layout of the hashes in signature files; bumped whenever they change for equal inputs, so that phase 2
# refuses to mix files from before and after (e.g. a corpus build resumed across an upgrade).
SIGNATURE_VERSION = 2


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
            text_hash.extend(exact_keys(spans))
        if config.fuzzy:
            signatures, has_shingles = hasher.batch(spans)
            sig_parts.append(signatures)
            shingled_parts.append(has_shingles)
        batch_texts.clear()

    for record, _ in iter_records(shard_path, config.text_field, skips):
        ids.append(record_id(record, config))
        url = record.get(config.url_field) if config.url else None
        has_url.append(isinstance(url, str) and bool(url.strip()))
        url_hash.append(hash128(normalize_url(url).encode("utf-8")) if has_url[-1] else (0, 0))
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
