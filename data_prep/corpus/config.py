"""``configs/data/<name>.yaml`` -> a validated corpus build plan.

Every problem (unknown keys, wrong types, bad thresholds, inputs that match nothing, a missing
classifier or benchmark file) is collected and raised once as a ``ConfigError`` naming each key, before
any stage runs. The plan (config + the expanded input shard list) is saved as ``<work_dir>/config.json``;
every task of every stage, local or on a SLURM node, reads that file, so all agree on shard numbering.
A rerun into the same work folder must have the same plan (apart from ``executor`` and ``mlflow``):
finished shards of another config would otherwise be mixed into the output.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from ...common.errors import UserError
from ...common.atomic import atomic_write_json
from ..filters.decontaminate import DecontaminationConfig
from ..dedup.config import DedupConfig
from ..readers.extract import ExtractConfig
from ..filters.langid import LanguageConfig
from ..filters.quality import C4Config, GopherConfig
from .shard_writer import FORMATS
from ..readers.web import DEFAULT_MAX_DOCUMENT_BYTES, InputFields, expand_inputs
from ...common.config import ConfigError, apply_overrides, build_config, load_yaml

PLAN_FILE = "config.json"
_RUNTIME_SECTIONS = ("executor", "mlflow")  # may change between reruns of one build


@dataclass(kw_only=True)
class InputConfig:
    paths: list[str]
    """Files, globs or folders: WARC/WET, JSONL (.gz/.zst), Parquet, local ``datasets`` folders. Each
    file (or datasets folder) is one shard: one task per stage, one output shard."""
    fields: InputFields = field(default_factory=InputFields)
    """Record fields holding text, id and url (JSONL, Parquet, datasets)."""
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    """Larger documents are skipped and counted (``document_too_large``)."""


@dataclass(kw_only=True)
class OutputConfig:
    dir: str
    """Kept documents as ``NNNNN.<format>`` shards, ``report.json`` and the plots."""
    format: Literal["jsonl.zst", "parquet"] = "jsonl.zst"
    work_dir: str | None = None
    """Intermediate shards, signatures and completion markers (default ``<dir>/_work``)."""


@dataclass(kw_only=True)
class StagesConfig:
    """Which optional stages run (HTML extraction always runs on WARC responses)."""

    language: bool = True
    gopher: bool = True
    c4: bool = True
    quality: bool = False
    """Needs ``quality.model_path`` (``gptforge quality train``)."""
    dedup: bool = True
    decontaminate: bool = False
    """Needs ``decontaminate.benchmarks``."""


@dataclass(kw_only=True)
class QualityConfig:
    model_path: str | None = None
    """The model written by ``gptforge quality train``."""
    alpha: float = 9.0
    """Keep a document iff ``pareto(alpha) > 1 - score`` (GPT-3 Appendix A: 9)."""
    seed: int = 0
    """Mixed with each document id: the same documents are kept on every rerun."""


@dataclass(kw_only=True)
class DecontaminateConfig:
    benchmarks: list[str] = field(default_factory=list)
    """JSONL files (or globs) of benchmark test examples to remove from the corpus."""
    fields: list[str] | None = None
    """Benchmark record fields to read (default: every string field)."""
    ngram: int = 13
    """Words per n-gram (GPT-3 Appendix C: 13)."""
    rules: DecontaminationConfig = field(default_factory=DecontaminationConfig)


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str | None = None
    time: str | None = None
    """Per task, e.g. ``"02:00:00"``."""
    cpus_per_task: int = 1
    mem: str | None = None
    max_parallel: int | None = None
    """At most this many array tasks of a stage at once."""
    extra_args: list[str] = field(default_factory=list)
    """Further ``sbatch`` arguments, e.g. ``["--account=myproj"]``."""
    python: str | None = None
    """The interpreter on the nodes (default: the one running ``corpus build``)."""


@dataclass(kw_only=True)
class ExecutorConfig:
    kind: Literal["local", "slurm"] = "local"
    workers: int = 1
    """Local worker processes (one shard each at a time)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass(kw_only=True)
class MlflowConfig:
    enabled: bool = True
    experiment: str = "corpus"
    run_name: str | None = None
    tracking_uri: str | None = None
    """Default: ``MLFLOW_TRACKING_URI``, else a sqlite store in the output folder."""


@dataclass(kw_only=True)
class CorpusConfig:
    input: InputConfig
    output: OutputConfig
    stages: StagesConfig = field(default_factory=StagesConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher: GopherConfig = field(default_factory=GopherConfig)
    c4: C4Config = field(default_factory=C4Config)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(kw_only=True)
class CorpusPlan:
    cfg: CorpusConfig
    raw: dict
    shards: list[str]
    """Input shards in a fixed order: shard i is task i of every per-shard stage."""
    work_dir: str
    plan_path: str

    @property
    def n_shards(self) -> int:
        return len(self.shards)


def _validate(cfg: CorpusConfig, raw: dict, errors: list[str]) -> list[str]:
    """Checks beyond types; returns the expanded input shards."""
    shards: list[str] = []
    try:
        shards = expand_inputs(cfg.input.paths)
    except ValueError as err:
        errors.append(f"input.paths: {err}")
    errors.extend(f"input.{e}" for e in cfg.input.fields.validate())
    if cfg.input.max_document_bytes < 1:
        errors.append(f"input.max_document_bytes must be >= 1, got {cfg.input.max_document_bytes}")
    errors.extend(cfg.extract.validate())
    errors.extend(cfg.language.validate())
    for key in ("text_field", "id_field", "url_field"):
        if key in raw.get("dedup", {}):
            errors.append(f"dedup.{key}: the corpus stages fix it; set input.fields instead")
    if cfg.stages.dedup:
        errors.extend(f"dedup.{e}" for e in cfg.dedup.errors())
    if cfg.stages.quality:
        if not cfg.quality.model_path:
            errors.append("quality.model_path: required with stages.quality (train one with 'gptforge quality train')")
        elif not os.path.isfile(cfg.quality.model_path):
            errors.append(f"quality.model_path: no such file {cfg.quality.model_path!r}")
        if cfg.quality.alpha <= 0:
            errors.append(f"quality.alpha must be > 0, got {cfg.quality.alpha}")
    if cfg.stages.c4 and cfg.c4.bad_words_path and not os.path.isfile(cfg.c4.bad_words_path):
        errors.append(f"c4.bad_words_path: no such file {cfg.c4.bad_words_path!r}")
    if cfg.stages.decontaminate:
        if not cfg.decontaminate.benchmarks:
            errors.append("decontaminate.benchmarks: at least one JSONL file with stages.decontaminate")
        found = []
        for pattern in cfg.decontaminate.benchmarks:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                errors.append(f"decontaminate.benchmarks: no such file {pattern!r}")
            found += matches
        cfg.decontaminate.benchmarks = found
        if cfg.decontaminate.ngram < 1:
            errors.append(f"decontaminate.ngram must be >= 1, got {cfg.decontaminate.ngram}")
    if cfg.executor.workers < 1:
        errors.append(f"executor.workers must be >= 1, got {cfg.executor.workers}")
    if cfg.executor.slurm.cpus_per_task < 1:
        errors.append(f"executor.slurm.cpus_per_task must be >= 1, got {cfg.executor.slurm.cpus_per_task}")
    if cfg.output.format not in FORMATS:
        errors.append(f"output.format must be one of {', '.join(FORMATS)}")
    return shards


def _fingerprint(raw: dict, shards: list[str]) -> str:
    fixed = {k: v for k, v in raw.items() if k not in _RUNTIME_SECTIONS}
    return hashlib.sha256(json.dumps([fixed, shards], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _absolute_paths(raw: dict, base: str) -> None:
    """Relative paths in a config are relative to the working directory of ``corpus build``; the plan
    stores them absolute so SLURM tasks started elsewhere read the same files."""
    def fix(section: str, key: str) -> None:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = os.path.abspath(os.path.join(base, node[key]))

    if isinstance(raw.get("input"), dict) and isinstance(raw["input"].get("paths"), list):
        raw["input"]["paths"] = [os.path.join(base, p) if isinstance(p, str) and not os.path.isabs(p) else p
                                 for p in raw["input"]["paths"]]
    for section, key in (("output", "dir"), ("output", "work_dir"), ("quality", "model_path"),
                         ("c4", "bad_words_path")):
        fix(section, key)
    node = raw.get("decontaminate")
    if isinstance(node, dict) and isinstance(node.get("benchmarks"), list):
        node["benchmarks"] = [os.path.abspath(os.path.join(base, p)) if isinstance(p, str) else p
                              for p in node["benchmarks"]]


def parse_corpus_config(raw: dict, errors: list[str], source: str) -> tuple[CorpusConfig, list[str]]:
    """(config, input shards); raises one ``ConfigError`` with ``errors`` and every problem found."""
    shards: list[str] = []
    # _validate also runs after type errors (a bad key keeps its default): all errors at once.
    cfg = build_config(CorpusConfig, raw, errors, source=source,
                       check=lambda cfg, errs: shards.extend(_validate(cfg, raw, errs)))
    return cfg, shards


def resolve_corpus(config_path: str, overrides: list[str]) -> CorpusPlan:
    """Load, override, validate (all errors at once), and write or check the build's plan file."""
    raw = load_yaml(config_path)
    errors = apply_overrides(raw, overrides)
    _absolute_paths(raw, os.getcwd())
    cfg, shards = parse_corpus_config(raw, errors, config_path)
    work_dir = cfg.output.work_dir or os.path.join(cfg.output.dir, "_work")
    plan_path = os.path.join(work_dir, PLAN_FILE)
    fingerprint = _fingerprint(raw, shards)
    if os.path.isfile(plan_path):
        with open(plan_path, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous.get("fingerprint") != fingerprint:
            changed = sorted(k for k in set(previous.get("raw", {})) | set(raw)
                             if k not in _RUNTIME_SECTIONS and previous.get("raw", {}).get(k) != raw.get(k))
            if previous.get("shards") != shards:
                changed.append("the input shard list")
            raise ConfigError([f"output.work_dir {work_dir!r} holds a build of another config (changed: "
                               f"{', '.join(changed) or 'unknown'}); use another output.dir, or delete it to "
                               f"start over"], source=config_path)
    atomic_write_json(plan_path, {"raw": raw, "shards": shards, "fingerprint": fingerprint, "work_dir": work_dir})
    return CorpusPlan(cfg=cfg, raw=raw, shards=shards, work_dir=work_dir, plan_path=plan_path)


def load_plan(plan_path: str) -> CorpusPlan:
    """The plan a build wrote (what every task runs from)."""
    if not os.path.isfile(plan_path):
        raise UserError(f"--config: no such plan file {plan_path!r} (written by 'gptforge corpus build')")
    with open(plan_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    cfg, _ = parse_corpus_config(saved["raw"], [], plan_path)
    return CorpusPlan(cfg=cfg, raw=saved["raw"], shards=saved["shards"], work_dir=saved["work_dir"],
                      plan_path=plan_path)


def fixed_dedup_config(cfg: CorpusConfig) -> DedupConfig:
    """The dedup config over the stages' own shards (fields ``id``, ``text``, ``url``)."""
    return dataclasses.replace(cfg.dedup, text_field="text", id_field="id", url_field="url")
