"""``gptforge corpus build|task`` and ``gptforge quality train``: the command-line side of the corpus stages."""

from __future__ import annotations

import argparse
import json


def _cmd_corpus_build(args: argparse.Namespace) -> int:
    from .build import build_corpus

    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"executor.kind={args.executor}")
    if args.workers is not None:
        overrides.append(f"executor.workers={args.workers}")
    result = build_corpus(args.config, overrides, wait=not args.no_wait, progress=not args.quiet)
    print(result)
    return 0


def _cmd_corpus_task(args: argparse.Namespace) -> int:
    from .stages import run_task

    stats = run_task(args.config, args.stage, args.index)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))
    return 0


def _cmd_quality_train(args: argparse.Namespace) -> int:
    from ..filters.classifier import train_quality_classifier

    report = train_quality_classifier(args.positive, args.negative, args.output, text_field=args.text_field,
                                      test_fraction=args.test_fraction, seed=args.seed,
                                      max_documents=args.max_documents)
    print(json.dumps(report, indent=2))
    return 0


def add_corpus_parsers(sub) -> None:
    corpus = sub.add_parser("corpus", help="build a filtered, deduplicated corpus from web data")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    p = csub.add_parser("build", help="read -> extract -> language -> quality -> dedup -> decontaminate -> write",
                        description="Overrides are key.sub=value (YAML values), e.g. executor.workers=4. "
                                    "A rerun skips the finished shards of every stage.")
    p.add_argument("--config", required=True, help="a YAML file such as configs/data/python-docs.yaml")
    p.add_argument("--executor", choices=["local", "slurm"], default=None, help="overrides executor.kind")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (overrides executor.workers)")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return without waiting")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=_cmd_corpus_build)

    p = csub.add_parser("task", help="run one task of one stage (what each SLURM array task runs)")
    p.add_argument("--config", required=True, help="the resolved config.json of a build's work folder")
    p.add_argument("--stage", required=True)
    p.add_argument("--index", type=int, required=True, help="shard index (SLURM_ARRAY_TASK_ID)")
    p.set_defaults(func=_cmd_corpus_task)

    quality = sub.add_parser("quality", help="the GPT-3 quality classifier").add_subparsers(
        dest="quality_command", required=True)
    p = quality.add_parser("train", help="fit the classifier: reference text (positives) vs raw crawl (negatives)")
    p.add_argument("--positive", nargs="+", required=True, help="JSONL/Parquet of reference text (WebText, books...)")
    p.add_argument("--negative", nargs="+", required=True, help="JSONL/Parquet of unfiltered crawl text")
    p.add_argument("--output", "-o", required=True, help="where to write the model file")
    p.add_argument("--text-field", default="text")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held out for the reported accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None, help="per class")
    p.set_defaults(func=_cmd_quality_train)
