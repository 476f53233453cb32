"""``gptforge corpus build`` end to end: real HTML (the Python docs packed into WARCs), German fortunes,
and generated English documents with planted duplicates and a planted benchmark passage; what each stage
removed, resumability, the quality classifier stage, config errors, and the hand-off to tokenize.
The SLURM run of the same build is in tests/test_corpus_slurm.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from helpers.launch import GPTFORGE
from helpers.web import fortunes, make_docs_warc, python_doc_pages, write_jsonl

# Generated English: stop words plus the words of the standard library's docstrings, in random order,
# so documents pass the language, Gopher and C4 rules (stop words, sentence ends, no repeated n-grams)
# and differ from each other.
STOP = ["the", "of", "and", "to", "that", "with", "have", "be", "in", "for", "is", "it", "a"]


def english_words() -> list[str]:
    import re

    from helpers.corpus import stdlib_docstrings

    return sorted({w for text in stdlib_docstrings(400) for w in re.findall(r"\b[a-z]{3,10}\b", text)})


def english_doc(rng: random.Random, words: list[str], sentences: int = 12) -> str:
    out = []
    for _ in range(sentences):
        chosen = [rng.choice(STOP) if rng.random() < 0.4 else rng.choice(words) for _ in range(rng.randint(9, 15))]
        out.append(" ".join(chosen).capitalize() + ".")
    return "\n".join(out)


def near_duplicate(text: str, rng: random.Random) -> str:
    """One word changed (inside a line): about 5 of ~150 word 5-grams differ, Jaccard about 0.94."""
    words = text.split(" ")
    plain = [i for i, w in enumerate(words) if w.isalpha()]
    i = rng.choice(plain)
    words[i] = words[i] + "x"
    return " ".join(words)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four input shards: two WARCs of Python docs pages (10 pages in both), German fortunes, generated
    English with planted duplicates and a document a benchmark overlaps."""
    root = tmp_path_factory.mktemp("corpus-inputs")
    pages = python_doc_pages()
    make_docs_warc(str(root / "a.warc.gz"), pages=pages[:40], images=1)
    make_docs_warc(str(root / "b.warc.gz"), pages=pages[30:70], images=0)
    german = fortunes("de", limit=20)
    write_jsonl(str(root / "c.jsonl.gz"), [{"id": f"de-{i}", "text": t} for i, t in enumerate(german)])
    rng, words = random.Random(5), english_words()
    docs = [{"id": f"gen-{i}", "url": f"https://example.org/{i}", "text": english_doc(rng, words)} for i in range(30)]
    docs.append({"id": "copy-of-gen-3", "url": "https://mirror.example.org/3", "text": docs[3]["text"]})
    docs.append({"id": "near-gen-7", "url": "https://mirror.example.org/7", "text": near_duplicate(docs[7]["text"], rng)})
    docs.append({"id": "same-url-as-gen-9", "url": "https://EXAMPLE.org/9#top", "text": english_doc(rng, words)})
    contaminated = english_doc(rng, words, sentences=30)
    docs.append({"id": "contaminated", "url": "https://example.org/c", "text": contaminated})
    write_jsonl(str(root / "d.jsonl.zst"), docs)
    middle = contaminated.split()[150:180]  # 30 words from the middle: 13-grams that only it contains
    write_jsonl(str(root / "benchmark.jsonl"), [{"question": " ".join(middle).upper() + "!", "answer": "x"}])
    return {"root": root, "pages": 80, "german": len(german), "generated": len(docs)}


def write_config(path, inputs, out, **sections) -> str:
    root = inputs["root"]
    cfg = {"input": {"paths": [str(root / n) for n in ("a.warc.gz", "b.warc.gz", "c.jsonl.gz", "d.jsonl.zst")]},
           "output": {"dir": str(out)},
           "language": {"keep": ["en"]},
           "stages": {"decontaminate": True},
           "decontaminate": {"benchmarks": [str(root / "benchmark.jsonl")]},
           "executor": {"workers": 2},
           "mlflow": {"enabled": True}}
    for key, value in sections.items():
        cfg[key] = cfg.get(key, {}) | value
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def corpus(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(GPTFORGE + ["corpus", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def read_output(out) -> dict[str, dict]:
    from gptforge.data_prep.corpus.shard_writer import read_shard

    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith((".jsonl.zst", ".parquet")):
            for record in read_shard(os.path.join(out, name)):
                found[record["id"]] = record
    return found


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus-build")
    out = tmp / "out"
    cfg = write_config(tmp / "cfg.yaml", inputs, out)
    proc = corpus("build", "--config", cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "cfg": cfg, "stdout": proc.stdout,
            "report": json.loads((out / "report.json").read_text()), "records": read_output(out)}


def test_each_stage_removes_what_it_should(built, inputs):
    report, records = built["report"], built["records"]
    stages = report["stages"]
    # Read: 80 pages + 1 PNG responses, German fortunes, generated documents; requests/warcinfo ignored.
    assert stages["filter"]["docs_in"] == inputs["pages"] + 1 + inputs["german"] + inputs["generated"]
    assert stages["filter"]["ignored_records"] == {"warc_request": 81, "warc_warcinfo": 2}
    removed = stages["filter"]["removed"]
    assert removed["not_html"] == 1  # the PNG
    assert removed["language_not_kept"] >= 0.9 * inputs["german"]
    assert not any(i.startswith("de-") for i in records)
    assert stages["filter"]["languages"]["en"] >= inputs["pages"] // 2
    assert any(r.startswith("gopher_") for r in removed) and any(r.startswith("c4_") for r in removed)
    assert stages["filter"]["lines_removed"]["c4_terminal_punctuation"] > 0
    # Every document is accounted for in each stage.
    assert stages["filter"]["docs_in"] == stages["filter"]["docs_out"] + sum(removed.values())
    assert stages["write"]["docs_in"] == stages["filter"]["docs_out"]
    # Dedup: the first in input order survives.
    dups = {d["id"]: d for d in map(json.loads, (built["out"] / "duplicates.jsonl").read_text().splitlines())}
    assert dups["copy-of-gen-3"] == {"id": "copy-of-gen-3", "duplicate_of": "gen-3", "reason": "duplicate_exact"}
    assert dups["near-gen-7"] == {"id": "near-gen-7", "duplicate_of": "gen-7", "reason": "duplicate_fuzzy"}
    assert dups["same-url-as-gen-9"]["duplicate_of"] == "gen-9"
    assert dups["same-url-as-gen-9"]["reason"] == "duplicate_url"
    docs_pages_dups = [d for d in dups.values() if d["id"].startswith("<urn:")]
    assert all(d["reason"] == "duplicate_url" for d in docs_pages_dups)  # pages 30-39 were crawled twice
    for name in ("gen-3", "gen-7", "gen-9"):
        assert name in records
    assert not {"copy-of-gen-3", "near-gen-7", "same-url-as-gen-9"} & set(records)
    # Decontamination: the benchmark passage and 200 characters each side are cut out, two pieces remain.
    assert "contaminated" not in records
    pieces = sorted(k for k in records if k.startswith("contaminated/"))
    assert pieces == ["contaminated/0", "contaminated/1"]
    assert all(len(records[p]["text"]) >= 200 for p in pieces)
    assert stages["write"]["decontamination"]["documents_contaminated"] == 1
    gen = [r for k, r in records.items() if k.startswith("gen-")]
    assert len(gen) == 30 and all(r["language"] == "en" for r in gen)
    assert report["totals"]["docs_out"] == len(records)
    for plot in ("removal_reasons.png", "dedup_cluster_sizes.png"):
        assert (built["out"] / plot).stat().st_size > 1000


def test_mlflow_run_holds_the_report(built):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str(built["out"] / "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("corpus").experiment_id])
    assert run.data.metrics["total.docs_out"] == len(built["records"])
    assert run.data.metrics["removed.not_html"] == 1
    assert run.data.params["language.keep"] == "['en']"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "removal_reasons.png"} <= artifacts


def test_rerun_skips_finished_shards_and_redoes_lost_ones(built, inputs):
    out = built["out"]
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".jsonl.zst")}
    proc = corpus("build", "--config", built["cfg"], "--quiet", "mlflow.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage filter: 4/4 tasks already done, skipped" in proc.stdout
    # A write task that died: its marker never appeared (its output may or may not have been renamed).
    os.remove(out / "_work" / "write" / "task_00001.done.json")
    os.remove(out / "00001.jsonl.zst")
    os.remove(out / "_work" / "report" / "task_00000.done.json")
    proc = corpus("build", "--config", built["cfg"], "--quiet", "mlflow.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage write: 1 task(s) run, 3 already done" in proc.stdout
    after = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".jsonl.zst")}
    assert after == before
    # Changing what the build does, into the same folder, is refused (it would mix two configs).
    proc = corpus("build", "--config", built["cfg"], "--quiet", "dedup.threshold=0.7")
    assert proc.returncode == 2 and "holds a build of another config (changed: dedup)" in proc.stderr


def test_report_survives_an_unreachable_tracking_server(built):
    """The report stage logs through the retrying Tracker: a tracking server nobody listens on (port 9 of
    127.0.0.1) costs a warning and counted dropped calls, never the build."""
    out = built["out"]
    marker = out / "_work" / "report" / "task_00000.done.json"
    if marker.exists():
        os.remove(marker)
    proc = corpus("build", "--config", built["cfg"], "--quiet", "mlflow.tracking_uri=http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow start run failed" in proc.stderr and "tracking calls were dropped" in proc.stderr
    done = json.loads(marker.read_text())
    assert done["mlflow_run_id"] is None and done["mlflow_dropped_calls"] > 0
    assert json.loads((out / "report.json").read_text())["totals"] == built["report"]["totals"]


def test_quality_stage_keeps_by_the_pareto_rule(inputs, tmp_path):
    """Train the classifier, then build with and without it: the documents it removed are exactly those
    whose seeded Pareto draw says so, and every kept one carries its score."""
    from gptforge.data_prep.filters.classifier import QualityClassifier

    from helpers.corpus import stdlib_docstrings

    rng = random.Random(1)
    positives = write_jsonl(str(tmp_path / "pos.jsonl"), [{"text": t} for t in stdlib_docstrings(300)])
    junk = [" ".join(rng.choice(["lorem", "click", "buy", "cheap", "free", "win", "$$$", "now", "best"])
                     for _ in range(rng.randint(20, 80))) for _ in range(300)]
    negatives = write_jsonl(str(tmp_path / "neg.jsonl"), [{"text": t} for t in junk])
    model = tmp_path / "quality.npz"
    proc = subprocess.run(GPTFORGE + ["quality", "train", "--positive", positives, "--negative", negatives,
                                      "-o", str(model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["held_out_accuracy"] > 0.9
    common = dict(stages={"dedup": False, "decontaminate": False}, mlflow={"enabled": False})
    plain = write_config(tmp_path / "plain.yaml", inputs, tmp_path / "plain", **common)
    assert corpus("build", "--config", plain, "--quiet").returncode == 0
    scored = write_config(tmp_path / "q.yaml", inputs, tmp_path / "q", **common | {
        "stages": common["stages"] | {"quality": True}, "quality": {"model_path": str(model), "seed": 3}})
    proc = corpus("build", "--config", scored, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = read_output(tmp_path / "plain"), read_output(tmp_path / "q")
    classifier = QualityClassifier.load(str(model), seed=3)
    scores = dict(zip(before, classifier.score([r["text"] for r in before.values()])))
    assert set(after) == {i for i in before if classifier.keep(i, float(scores[i]))}
    assert 0 < len(after) < len(before)
    assert all(abs(r["quality_score"] - scores[i]) < 1e-9 for i, r in after.items())
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["totals"]["removed"]["quality_classifier"] == len(before) - len(after)
    assert sum(report["stages"]["filter"]["quality_hist"]) == len(before)
    assert (tmp_path / "q" / "quality_scores.png").is_file()


def test_parquet_output_feeds_tokenize(inputs, tmp_path, tokenizer_model):
    cfg = write_config(tmp_path / "cfg.yaml", inputs, tmp_path / "out", output={"format": "parquet"},
                       stages={"decontaminate": False}, mlflow={"enabled": False})
    proc = corpus("build", "--config", cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_output(tmp_path / "out")
    assert records["gen-0"]["language"] == "en" and records["gen-0"]["url"] == "https://example.org/0"
    shards = sorted(str(tmp_path / "out" / n) for n in os.listdir(tmp_path / "out") if n.endswith(".parquet"))
    proc = subprocess.run(GPTFORGE + ["tokenize", "--input", *shards, "--output", str(tmp_path / "tok" / "corpus"),
                                      "--tokenizer", tokenizer_model, "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(records)} documents" in proc.stdout


def test_config_errors_are_all_reported_at_once(inputs, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", inputs, tmp_path / "out", stages={"quality": True},
                       dedup={"threshold": 1.5, "text_field": "body"}, gopher={"min_wordz": 3})
    proc = corpus("build", "--config", cfg, "--quiet", "input.paths=[nothing/*.warc.gz]", "executor.workers=0")
    assert proc.returncode == 2
    for message in ("gopher.min_wordz: unknown key", "input.paths:", "nothing/*.warc.gz",
                    "quality.model_path: required with stages.quality", "dedup.threshold must be in (0, 1)",
                    "dedup.text_field: the corpus stages fix it", "executor.workers must be >= 1"):
        assert message in proc.stderr, (message, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_killed_build_resumes_to_the_same_corpus(built, inputs, tmp_path):
    """SIGKILL in the middle of writing shard 3: no torn shard under a final name; the rerun redoes
    only the unfinished tasks and the corpus equals an uninterrupted build's, byte for byte."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", inputs, out, executor={"workers": 1}, mlflow={"enabled": False})
    faults = os.path.join(os.path.dirname(__file__), "helpers", "corpus_faults.py")
    proc = subprocess.run([sys.executable, faults, "write", "3", "5", "corpus", "build", "--config", cfg, "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9
    assert sorted(n for n in os.listdir(out) if n.endswith(".jsonl.zst")) == [f"0000{i}.jsonl.zst" for i in range(3)]
    assert any(n.startswith(".00003.jsonl.zst.") for n in os.listdir(out))  # the torn temporary file
    proc = corpus("build", "--config", cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage write: 1 task(s) run, 3 already done" in proc.stdout
    assert not any(n.startswith(".") for n in os.listdir(out))
    want = {n: (built["out"] / n).read_bytes() for n in os.listdir(built["out"]) if n.endswith(".jsonl.zst")}
    assert {n: (out / n).read_bytes() for n in want} == want


def test_bad_input_is_counted_in_the_report(tmp_path):
    import gzip

    good = [json.dumps({"id": f"ok-{i}", "text": f"document {i}"}).encode() + b"\n" for i in range(3)]
    data = good[0] + b"{not json\n" + good[1] + b'{"body": "no text field"}\n' + good[2] + b"\xff\xfe\n"
    data += json.dumps({"id": "cut", "text": random.Random(0).randbytes(4000).hex()}).encode() + b"\n"
    packed = gzip.compress(data)
    (tmp_path / "bad.jsonl.gz").write_bytes(packed[: len(packed) - 50])  # the last record is cut off
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cfg = {"input": {"paths": [str(tmp_path / "bad.jsonl.gz"), str(tmp_path / "empty.jsonl")]},
           "output": {"dir": str(tmp_path / "out")}, "mlflow": {"enabled": False},
           "stages": {"language": False, "gopher": False, "c4": False, "dedup": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = corpus("build", "--config", str(tmp_path / "cfg.yaml"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    filtered = report["stages"]["filter"]
    assert filtered["skipped"] == {"invalid_json": 1, "missing_field_text": 1, "invalid_utf8": 1,
                                   "truncated_or_corrupt_file": 1, "empty_file": 1}
    assert filtered["skipped_examples"]["invalid_json"] == [f"{tmp_path / 'bad.jsonl.gz'}:2"]
    assert sorted(read_output(tmp_path / "out")) == ["ok-0", "ok-1", "ok-2"]


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                           "data")) if n.endswith(".yaml")))
def test_shipped_data_configs_are_valid(name, tmp_path):
    """Every configs/data/*.yaml parses without error once its data files exist."""
    from gptforge.data_prep.corpus.config import parse_corpus_config

    raw = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "data", name)))
    data = write_jsonl(str(tmp_path / "d.jsonl"), [{"id": "1", "text": "x"}])
    raw["input"]["paths"] = [data]
    if raw.get("quality", {}).get("model_path"):
        raw["quality"]["model_path"] = data  # only its existence is checked here
    if raw.get("decontaminate", {}).get("benchmarks"):
        raw["decontaminate"]["benchmarks"] = [str(tmp_path / "*.jsonl")]
    cfg, shards = parse_corpus_config(raw, [], name)  # raises a ConfigError naming every problem
    assert shards == [data]
