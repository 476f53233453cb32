"""``gptforge dedup INPUT... -o OUT``: the three dedup phases of ``dedup.py`` run locally, phases 1 and 3
over a pool of ``--workers`` processes (one task per input file).

OUT receives ``kept-NNNNN.jsonl`` (the kept records of input N, in input order), ``duplicates.jsonl`` and
``report.json``. A rerun into the same OUT replaces every file atomically (readers never see a partial
file); kept shards of an earlier run that this run does not write (it had more inputs) are deleted
after the new ones are in place, and ``report.json``, written last, lists the shards of the run.
Signature and removal files live in a temporary folder inside OUT, deleted at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time

from ...common.atomic import atomic_writer
from ...common.errors import UserError
from .dedup import (DedupConfig, cluster_signatures, compute_signatures,
                                      config_flag_names, write_duplicates, write_kept)
from ..readers.documents import SkipLog, check_input_files


def _kept_name(index: int) -> str:
    return f"kept-{index:05d}.jsonl"


def _check_paths(inputs: list[str], out_dir: str, workers: int) -> list[str]:
    errors = check_input_files(inputs, flag="INPUT")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        errors.append(f"-o/--output: {out_dir!r} exists and is not a directory")
    ours = {os.path.realpath(os.path.join(out_dir, name)) for name in ("duplicates.jsonl", "report.json")}
    for path in inputs:
        real = os.path.realpath(path)
        if real in ours or (os.path.dirname(real) == os.path.realpath(out_dir)
                            and os.path.basename(real).startswith("kept-")):
            errors.append(f"INPUT {path!r} is inside -o/--output and would be overwritten")
    if workers < 1:
        errors.append(f"--workers must be >= 1, got {workers}")
    return errors


def _run_tasks(function, tasks: list[tuple], workers: int) -> list:
    """``function(*task)`` for every task, in a spawn pool when it helps; results in task order."""
    if workers == 1 or len(tasks) == 1:
        return [function(*task) for task in tasks]
    with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        return pool.starmap(function, tasks)


def run_dedup(inputs: list[str], out_dir: str, config: DedupConfig, *, workers: int = 1) -> dict:
    """Deduplicate ``inputs`` into ``out_dir`` (see the module docstring); returns the report."""
    errors = _check_paths(inputs, out_dir, workers) + config.errors(config_flag_names())
    if errors:
        raise UserError("; ".join(errors))
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=out_dir, prefix=".dedup-work-")
    try:
        signature_paths = [os.path.join(work, f"signatures-{i:05d}.npz") for i in range(len(inputs))]
        shards = _run_tasks(compute_signatures, [(path, sig, config) for path, sig in zip(inputs, signature_paths)],
                            workers)
        signed = time.perf_counter()
        removal_path = os.path.join(work, "removals.npz")
        clusters = cluster_signatures(signature_paths, removal_path, config)
        clustered = time.perf_counter()
        kept_paths = [os.path.join(out_dir, _kept_name(i)) for i in range(len(inputs))]
        kept = _run_tasks(write_kept, [(path, i, removal_path, out, config)
                                       for i, (path, out) in enumerate(zip(inputs, kept_paths))], workers)
        write_duplicates(removal_path, os.path.join(out_dir, "duplicates.jsonl"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in sorted(set(glob.glob(os.path.join(out_dir, "kept-*.jsonl"))) - set(kept_paths)):
        os.remove(stale)
    skips = SkipLog()
    for shard in shards:
        skips.merge(shard.skips)
    seconds = time.perf_counter() - start
    report = {
        "inputs": list(inputs),
        "outputs": [os.path.basename(path) for path in kept_paths],
        "documents": clusters.documents,
        "kept": sum(kept),
        "kept_per_output": kept,
        "removed": clusters.removed,
        "removed_total": sum(clusters.removed.values()),
        "skipped": {"total": skips.total, "counts": dict(skips.counts), "examples": skips.examples},
        "cluster_sizes": clusters.clusters,
        "lsh": {"threshold": config.threshold, "num_perm": config.num_perm, "ngram": config.ngram,
                "bands": clusters.bands, "rows": clusters.rows, "verify": config.verify,
                "candidate_pairs": clusters.candidate_pairs, "rejected_pairs": clusters.rejected_pairs},
        "config": {key: value for key, value in vars(config).items()},
        "workers": workers,
        "seconds": {"signatures": round(signed - start, 3), "cluster": round(clustered - signed, 3),
                    "write": round(seconds - (clustered - start), 3), "total": round(seconds, 3)},
        "docs_per_s": round(clusters.documents / seconds, 1) if seconds > 0 else None,
    }
    with atomic_writer(os.path.join(out_dir, "report.json"), "w") as handle:
        handle.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run(args: argparse.Namespace) -> int:
    config = DedupConfig(text_field=args.text_field, id_field=args.id_field, url_field=args.url_field,
                         url=not args.no_url, exact=not args.no_exact, fuzzy=not args.no_fuzzy,
                         threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, bands=args.bands,
                         rows=args.rows, verify=not args.no_verify, seed=args.seed, batch_docs=args.batch_docs,
                         batch_bytes=args.batch_bytes)
    report = run_dedup(args.input, args.output, config, workers=args.workers)
    removed = ", ".join(f"{reason} {count}" for reason, count in report["removed"].items())
    print(f"dedup {report['documents']} documents -> kept {report['kept']} in {args.output} "
          f"({removed}) in {report['seconds']['total']:.1f}s, {report['docs_per_s']} docs/s; "
          f"skipped {report['skipped']['total']} bad record(s)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``gptforge dedup`` (command-table module of ``launcher/cli.py``)."""
    defaults = DedupConfig()
    p.description = ("Writes OUT/kept-NNNNN.jsonl (kept records, unchanged), OUT/duplicates.jsonl and "
                     "OUT/report.json; reruns replace them.")
    p.add_argument("input", nargs="+", help="JSONL (.jsonl/.jsonl.gz/.jsonl.zst) or Parquet files, in input order")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=defaults.threshold,
                   help=f"Jaccard similarity of near-duplicates (default {defaults.threshold})")
    p.add_argument("--num-perm", type=int, default=defaults.num_perm, help="MinHash permutations (default 128)")
    p.add_argument("--ngram", type=int, default=defaults.ngram, help="words per shingle (default 5)")
    p.add_argument("--bands", type=int, default=None, help="LSH bands (with --rows; default: chosen for --threshold)")
    p.add_argument("--rows", type=int, default=None, help="signature values per LSH band (with --bands)")
    p.add_argument("--text-field", default=defaults.text_field)
    p.add_argument("--id-field", default=defaults.id_field, help="id in duplicates.jsonl (default: a content hash)")
    p.add_argument("--url-field", default=defaults.url_field)
    p.add_argument("--no-url", action="store_true", help="no URL dedup")
    p.add_argument("--no-exact", action="store_true", help="no exact-text dedup")
    p.add_argument("--no-fuzzy", action="store_true", help="no MinHash near-duplicate dedup")
    p.add_argument("--no-verify", action="store_true",
                   help="link every LSH candidate pair, without checking its estimated Jaccard")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the MinHash functions")
    p.add_argument("--batch-docs", type=int, default=defaults.batch_docs, help="most documents per hashing batch")
    p.add_argument("--batch-bytes", type=int, default=defaults.batch_bytes,
                   help=f"text bytes at which a hashing batch is full (default {defaults.batch_bytes})")
    p.add_argument("--workers", type=int, default=1, help="processes for the per-file phases (default 1)")
