"""The data commands run without importing torch (nor megatron-core, deepspeed, transformers): each is run
for real, in-process in a fresh interpreter, on small inputs, then ``sys.modules`` is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

HEAVY = ("torch", "megatron", "deepspeed", "transformers")

RUN = """
import sys
from gptforge.launcher.cli import main
status = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print('HEAVY', ' '.join(heavy))
sys.exit(status)
"""


def run_in_process(*argv: str, cwd=None) -> str:
    proc = subprocess.run([sys.executable, "-c", RUN.format(heavy=set(HEAVY)), *argv], capture_output=True,
                          text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heavy = proc.stdout.strip().splitlines()[-1]
    assert heavy == "HEAVY", f"gptforge {' '.join(argv)} imported: {heavy[len('HEAVY '):]}"
    return proc.stdout


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from helpers.corpus import stdlib_docstrings

    root = tmp_path_factory.mktemp("no_torch")
    docs = [t for t in stdlib_docstrings() if len(t) > 200][:120]
    (root / "txt").mkdir()
    for i, text in enumerate(docs[:20]):
        (root / "txt" / f"{i}.txt").write_text(text, encoding="utf-8")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(docs + docs[:10]):  # ten exact duplicates for dedup to find
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
    with open(root / "other.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(docs[60:]):
            handle.write(json.dumps({"id": i, "text": text.upper()}) + "\n")
    return root


def test_files_to_jsonl(texts, tmp_path):
    out = run_in_process("files-to-jsonl", str(texts / "txt"), "-o", str(tmp_path / "t.jsonl"))
    assert "wrote 20 documents" in out


def test_dedup(texts, tmp_path):
    out = run_in_process("dedup", str(texts / "docs.jsonl"), "-o", str(tmp_path / "dedup"))
    report = json.loads((tmp_path / "dedup" / "report.json").read_text())
    assert report["documents"] == 130 and report["removed"]["duplicate_exact"] >= 10 and "kept" in out


def test_tokenizer_train_and_tokenize(texts, tmp_path):
    run_in_process("tokenizer", "train", "--input", str(texts / "docs.jsonl"), "--output", str(tmp_path / "tok"),
                   "--vocab-size", "400")
    out = run_in_process("tokenize", "--input", str(texts / "docs.jsonl"), "--output", str(tmp_path / "ds"),
                         "--tokenizer", str(tmp_path / "tok.model"), "--quiet")
    assert "130 documents" in out and (tmp_path / "ds.idx").is_file()


def test_quality_train(texts, tmp_path):
    out = run_in_process("quality", "train", "--positive", str(texts / "docs.jsonl"), "--negative",
                         str(texts / "other.jsonl"), "-o", str(tmp_path / "q.npz"))
    assert json.loads(out[:out.rindex("HEAVY")])["output_path"] == str(tmp_path / "q.npz")


def test_corpus_build_and_task(texts, tmp_path):
    import yaml

    cfg = {"input": {"paths": [str(texts / "docs.jsonl"), str(texts / "other.jsonl")]},
           "output": {"dir": str(tmp_path / "corpus")}, "mlflow": {"enabled": False}}
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_in_process("corpus", "build", "--config", str(path), "--quiet")
    assert "corpus " in out and "documents in" in out
    plan = tmp_path / "corpus" / "_work" / "config.json"
    # A finished task reports its marker again, as a rerun SLURM array task does.
    out = run_in_process("corpus", "task", "--config", str(plan), "--stage", "filter", "--index", "1")
    assert json.loads(out.splitlines()[0])
