"""The corpus build's stages, one task at a time (what a local worker or a SLURM array task runs).

1. ``filter`` (per shard): read -> extract HTML -> language ID -> Gopher -> C4 -> quality classifier;
   kept documents go to ``<work>/filtered/NNNNN.jsonl.zst``.
2. ``signatures`` (per shard): dedup phase 1 (URL/text hashes, MinHash) and, with decontamination, the
   per-shard document counts of benchmark n-grams.
3. ``cluster`` (one task): dedup phase 2 over all shards (union-find, survivors) and the set of
   benchmark n-grams common enough to ignore (GPT-3 Appendix C).
4. ``write`` (per shard): drop duplicates, decontaminate, write ``<output>/NNNNN.<format>``.
5. ``report`` (one task): ``report.json``, plots, MLflow.

A task writes its outputs atomically, then its completion marker (its counts, read by the report); a
task whose marker exists is not run again.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import numpy as np

from ...common.atomic import atomic_write_bytes, atomic_write_json
from ...common.errors import UserError
from .config import CorpusPlan, fixed_dedup_config, load_plan
from .executor import StageSpec, marker_path
from .report import QUALITY_BINS
from ..readers.documents import SkipLog
from .shard_writer import ShardWriter, read_shard, shard_name
from ..readers.web_document import WebDocument

STAGES = [StageSpec(name="filter", per_shard=True), StageSpec(name="signatures", per_shard=True),
          StageSpec(name="cluster", per_shard=False), StageSpec(name="write", per_shard=True),
          StageSpec(name="report", per_shard=False)]
QUALITY_BATCH = 256  # documents scored per classifier call (one sparse matrix product)


def _path(plan: CorpusPlan, *parts: str) -> str:
    return os.path.join(plan.work_dir, *parts)


def filtered_path(plan: CorpusPlan, index: int) -> str:
    return _path(plan, "filtered", shard_name(index, "jsonl.zst"))


def benchmark_ngrams_path(plan: CorpusPlan) -> str:
    return _path(plan, "decontaminate", "benchmark_ngrams.npz")


def prepare(plan: CorpusPlan) -> None:
    """Driver-side work before any task: the benchmark n-grams every decontamination task reads."""
    from ..filters.decontaminate import BenchmarkNgrams

    cfg = plan.cfg
    if cfg.stages.decontaminate and not os.path.isfile(benchmark_ngrams_path(plan)):
        ngrams = BenchmarkNgrams.from_files(cfg.decontaminate.benchmarks, cfg.decontaminate.fields,
                                            n=cfg.decontaminate.ngram)
        ngrams.save(benchmark_ngrams_path(plan))


def _filter(plan: CorpusPlan, index: int) -> dict:
    from ..readers.extract import extract_document
    from ..readers.web import iter_web_documents

    cfg = plan.cfg
    checks = []
    languages: Counter = Counter()
    if cfg.stages.language:
        from ..filters.langid import LanguageIdentifier

        identifier = LanguageIdentifier(cfg.language)

        def language(doc):
            reason = identifier.filter(doc)
            languages[doc.meta["language"]] += 1
            return reason

        checks.append(language)
    c4 = None
    if cfg.stages.gopher:
        from ..filters.quality import GopherQualityFilter

        checks.append(GopherQualityFilter(cfg.gopher))
    if cfg.stages.c4:
        from ..filters.quality import C4QualityFilter

        c4 = C4QualityFilter(cfg.c4)
        checks.append(c4)
    classifier = None
    if cfg.stages.quality:
        from ..filters.classifier import QualityClassifier

        classifier = QualityClassifier.load(cfg.quality.model_path, alpha=cfg.quality.alpha, seed=cfg.quality.seed)
    skips, ignored, removed = SkipLog(), Counter(), Counter()
    hist = np.zeros(QUALITY_BINS, dtype=np.int64)
    docs_in = bytes_in = 0
    pending: list[WebDocument] = []
    with ShardWriter(filtered_path(plan, index), "jsonl.zst") as writer:
        def score_pending() -> None:
            for doc, reason in zip(pending, classifier.filter_batch(pending)):
                hist[min(int(doc.meta["quality_score"] * QUALITY_BINS), QUALITY_BINS - 1)] += 1
                if reason:
                    removed[reason] += 1
                else:
                    writer.write(doc.to_record())
            pending.clear()

        for doc in iter_web_documents(plan.shards[index], fields=cfg.input.fields, skips=skips,
                                      max_document_bytes=cfg.input.max_document_bytes, ignored=ignored):
            docs_in += 1
            bytes_in += len(doc.html) if doc.html is not None else len(doc.text.encode("utf-8"))
            reason = extract_document(doc, cfg.extract)
            for check in checks:
                if reason is not None:
                    break
                reason = check(doc)
            if reason is not None:
                removed[reason] += 1
            elif classifier is not None:
                pending.append(doc)
                if len(pending) >= QUALITY_BATCH:
                    score_pending()
            else:
                writer.write(doc.to_record())
        if pending:
            score_pending()
    stats = {"input": plan.shards[index], "docs_in": docs_in, "bytes_in": bytes_in, "docs_out": writer.count,
             "bytes_out": writer.bytes, "removed": dict(removed), "skipped": dict(skips.counts),
             "skipped_examples": skips.examples, "ignored_records": dict(ignored), "languages": dict(languages)}
    if c4 is not None:
        stats["lines_removed"] = {k.split(":", 1)[1]: v for k, v in c4.counts.items() if k.startswith("lines_removed:")}
    if classifier is not None:
        stats["quality_hist"] = hist.tolist()
    return stats


def _signatures(plan: CorpusPlan, index: int) -> dict:
    cfg, shard = plan.cfg, filtered_path(plan, index)
    stats: dict = {}
    if cfg.stages.dedup:
        from ..dedup.dedup import compute_signatures

        result = compute_signatures(shard, _path(plan, "signatures", f"{index:05d}.npz"), fixed_dedup_config(cfg))
        stats["documents"] = result.records
    if cfg.stages.decontaminate:
        from ..filters.decontaminate import BenchmarkNgrams, count_ngram_documents

        ngrams = BenchmarkNgrams.load(benchmark_ngrams_path(plan))
        counts = count_ngram_documents((r["text"] for r in read_shard(shard)), ngrams)
        counts.save(_path(plan, "decontaminate", f"counts_{index:05d}.npz"))
    return stats


def removal_path(plan: CorpusPlan) -> str:
    return _path(plan, "dedup", "removal.npz")


def ignored_ngrams_path(plan: CorpusPlan) -> str:
    return _path(plan, "decontaminate", "ignored.npy")


def _cluster(plan: CorpusPlan, index: int) -> dict:
    cfg = plan.cfg
    stats: dict = {}
    if cfg.stages.dedup:
        from ..dedup.dedup import cluster_signatures, write_duplicates

        paths = [_path(plan, "signatures", f"{i:05d}.npz") for i in range(plan.n_shards)]
        summary = cluster_signatures(paths, removal_path(plan), fixed_dedup_config(cfg))
        write_duplicates(removal_path(plan), os.path.join(cfg.output.dir, "duplicates.jsonl"))
        sizes: Counter = Counter()
        for histogram in summary.clusters.values():
            sizes.update(histogram)
        stats |= {"documents": summary.documents, "duplicates_found": summary.removed,
                  "cluster_sizes": dict(sizes), "lsh_bands": summary.bands, "lsh_rows": summary.rows,
                  "candidate_pairs": summary.candidate_pairs, "rejected_pairs": summary.rejected_pairs}
    if cfg.stages.decontaminate:
        from ..filters.decontaminate import BenchmarkNgrams, NgramDocumentCounts

        ngrams = BenchmarkNgrams.load(benchmark_ngrams_path(plan))
        counts = NgramDocumentCounts.merge_files(
            [_path(plan, "decontaminate", f"counts_{i:05d}.npz") for i in range(plan.n_shards)])
        ignored = counts.ignored(ngrams, cfg.decontaminate.rules.max_ngram_documents)  # [k] uint64
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.asarray(ignored, dtype=np.uint64))
        atomic_write_bytes(ignored_ngrams_path(plan), buffer.getvalue())
        stats |= {"benchmark_ngrams": len(ngrams), "ngrams_ignored": int(len(ignored))}
    return stats


def _dedup_drops(plan: CorpusPlan, index: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """([records] bool removed, [records] reason index, reason names) of filtered shard ``index``."""
    with np.load(removal_path(plan)) as removal:
        meta = json.loads(str(removal["meta"]))
        records = meta["shards"][index]["records"]
        mine = removal["shard"] == index
        drop = np.zeros(records, dtype=bool)
        reason = np.zeros(records, dtype=np.int64)
        drop[removal["position"][mine]] = True
        reason[removal["position"][mine]] = removal["reason"][mine]
    return drop, reason, meta["reasons"]


def _write(plan: CorpusPlan, index: int) -> dict:
    cfg = plan.cfg
    drop = reason = names = None
    if cfg.stages.dedup:
        drop, reason, names = _dedup_drops(plan, index)
    decontaminator = None
    if cfg.stages.decontaminate:
        from ..filters.decontaminate import BenchmarkNgrams, Decontaminator

        decontaminator = Decontaminator(BenchmarkNgrams.load(benchmark_ngrams_path(plan)),
                                        np.load(ignored_ngrams_path(plan)), cfg.decontaminate.rules)
    removed: Counter = Counter()
    docs_in = bytes_in = 0
    out = os.path.join(cfg.output.dir, shard_name(index, cfg.output.format))
    with ShardWriter(out, cfg.output.format) as writer:
        for position, record in enumerate(read_shard(filtered_path(plan, index))):
            docs_in += 1
            bytes_in += len(record["text"].encode("utf-8"))
            if drop is not None and drop[position]:
                removed[names[int(reason[position])]] += 1
                continue
            if decontaminator is None:
                writer.write(record)
                continue
            meta = {k: v for k, v in record.items() if k not in ("id", "text", "url")}
            doc = WebDocument(id=record["id"], text=record["text"], url=record.get("url"), meta=meta)
            before = Counter(decontaminator.counts)
            pieces = decontaminator(doc)
            if not pieces:
                dropped = [k for k in decontaminator.counts if k.startswith("documents_dropped:")
                           and decontaminator.counts[k] > before.get(k, 0)]
                removed[dropped[0].split(":", 1)[1] if dropped else "decontamination"] += 1
            for piece in pieces:
                writer.write(piece.to_record())
    stats = {"docs_in": docs_in, "bytes_in": bytes_in, "docs_out": writer.count, "bytes_out": writer.bytes,
             "removed": dict(removed)}
    if decontaminator is not None:
        stats["decontamination"] = {k: v for k, v in decontaminator.counts.items()
                                    if not k.startswith("documents_dropped:")}
    return stats


def _report(plan: CorpusPlan, index: int) -> dict:
    from .report import log_to_mlflow, write_report

    cfg = plan.cfg
    report, files = write_report(plan.work_dir, cfg.output.dir, [s.name for s in STAGES if s.name != "report"])
    stats = {"docs_out": report["totals"]["docs_out"]}
    if cfg.mlflow.enabled:
        from ...common.tracking import default_tracking_uri

        uri = default_tracking_uri(cfg.output.dir, cfg.mlflow.tracking_uri)
        flat = {}

        def walk(prefix: str, node) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), value)
            else:
                flat[prefix] = node

        walk("", {k: v for k, v in plan.raw.items() if k != "mlflow"})
        flat["input.shards"] = plan.n_shards
        stats["mlflow_run_id"], stats["mlflow_dropped_calls"] = log_to_mlflow(
            report, flat, files, tracking_uri=uri, run_dir=cfg.output.dir, experiment=cfg.mlflow.experiment,
            run_name=cfg.mlflow.run_name)
    return stats


_RUN = {"filter": _filter, "signatures": _signatures, "cluster": _cluster, "write": _write, "report": _report}


def run_task(plan_path: str, stage: str, index: int) -> dict:
    """Run task ``index`` of ``stage`` unless its marker exists; returns its counts (the marker)."""
    if stage not in _RUN:
        raise UserError(f"--stage must be one of {', '.join(_RUN)}, got {stage!r}")
    plan = load_plan(plan_path)
    marker = marker_path(plan.work_dir, stage, index)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            return json.load(handle)
    per_shard = next(s.per_shard for s in STAGES if s.name == stage)
    count = plan.n_shards if per_shard else 1
    if not 0 <= index < count:
        raise UserError(f"--index {index} is out of range: stage {stage} has {count} task(s)")
    start = time.perf_counter()
    stats = _RUN[stage](plan, index)
    stats |= {"stage": stage, "index": index, "seconds": round(time.perf_counter() - start, 3)}
    atomic_write_json(marker, stats)
    return stats
