import gzip
import json
import os
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.training.data import import_megatron_datasets
from gptforge.data_prep.tokenization.indexed_writer import read_metadata, tokenize_to_indexed
from gptforge.data_prep.tokenization.tokenizer import EOD_TOKEN, Tokenizer, train_tokenizer

from helpers.launch import GPTFORGE


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return Tokenizer(tokenizer_model)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_round_trip_on_arbitrary_utf8(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_no_unknown_tokens_and_special_cases(tok):
    for text in ["", " ", "  two  spaces ", "\u2581 marks \u2581\u2581", "\x00\x01\r\n\t", "日本語のテキスト",
                 "emoji \U0001F600 and \U0010FFFF", "e\u0301 vs \u00e9"]:
        ids = tok.encode(text)
        assert 0 not in ids  # id 0 is <unk>: byte fallback means it never appears
        assert tok.decode(ids) == text


def test_end_of_text_is_a_control_token(tok):
    assert tok.sp.id_to_piece(tok.eod) == EOD_TOKEN
    assert tok.eod not in tok.encode(f"a {EOD_TOKEN} b")  # typed text never becomes the separator


def test_indexed_dataset_readable_by_megatron(tok, corpus_jsonl, indexed_prefix):
    _, _, indexed_dataset = import_megatron_datasets()
    ds = indexed_dataset.IndexedDataset(indexed_prefix)
    texts = [json.loads(line)["text"] for line in open(corpus_jsonl)]
    assert len(ds) == len(texts)
    for i in (0, 7, len(texts) - 1):
        assert ds[i].tolist() == tok.encode(texts[i]) + [tok.eod]
    assert ds[0].dtype == np.uint16  # optimal dtype for a 512 vocabulary
    meta = read_metadata(indexed_prefix)
    assert meta["documents"] == len(texts) and meta["tokens"] == int(ds.sequence_lengths.sum())
    assert meta["tokenizer"]["sha256"] == tok.sha256


def test_workers_give_identical_output(tmp_path, corpus_jsonl, tokenizer_model, indexed_prefix):
    out = str(tmp_path / "par")
    tokenize_to_indexed([corpus_jsonl], out, tokenizer_model, workers=2, chunk_docs=7, progress=False)
    for ext in (".bin", ".idx"):
        assert open(out + ext, "rb").read() == open(indexed_prefix + ext, "rb").read()


def test_bad_records_are_counted_and_good_ones_kept(tmp_path, tokenizer_model):
    good = [{"text": "first good document"}, {"text": "second good one"}, {"text": "third"}]
    lines = [json.dumps(good[0]).encode(), b"{not json", json.dumps({"body": "no text"}).encode(),
             b"\xff\xfe invalid utf8", json.dumps(good[1]).encode(), json.dumps({"text": 5}).encode(),
             json.dumps({"text": ""}).encode(), json.dumps(good[2]).encode()]
    src = tmp_path / "mixed.jsonl.gz"
    with gzip.open(src, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    truncated = tmp_path / "cut.jsonl.gz"
    data = gzip.compress((json.dumps({"text": "lost in a torn file"}) + "\n").encode() * 50)
    truncated.write_bytes(data[: len(data) // 2])
    result = tokenize_to_indexed([str(src), str(truncated)], str(tmp_path / "out"), tokenizer_model, progress=False)
    counts = dict(result.skips.counts)
    assert counts["invalid_json"] == 1 and counts["missing_field_text"] == 1
    assert counts["invalid_utf8"] == 1 and counts["non_string_text"] == 1 and counts["empty_text"] == 1
    assert counts["truncated_or_corrupt_file"] == 1
    assert result.documents >= 3  # the three good ones plus whatever lines of the torn file were whole
    assert any(w.startswith(str(src) + ":2") for w in result.skips.examples["invalid_json"])


def test_empty_input_fails_and_leaves_nothing(tmp_path, tokenizer_model):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    proc = subprocess.run(GPTFORGE + ["tokenize", "--input", str(src), "--output", str(tmp_path / "out"),
                                      "--tokenizer", tokenizer_model, "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: tokenize: no documents") and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == ["empty.jsonl"]


def test_missing_inputs_are_named(tmp_path, tokenizer_model):
    proc = subprocess.run(GPTFORGE + ["tokenize", "--input", str(tmp_path / "nope.jsonl"), str(tmp_path / "x.csv"),
                                      "--output", str(tmp_path / "o"), "--tokenizer", tokenizer_model],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr and "x.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_tokenizer_cli_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers.corpus import stdlib_docstrings

    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": stdlib_docstrings(60)}), src)
    proc = subprocess.run(GPTFORGE + ["tokenizer", "train", "--input", str(src), "--output", str(tmp_path / "t"),
                                      "--vocab-size", "400", "--text-field", "content"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer(str(tmp_path / "t.model"))
    assert tok.vocab_size == 400
    proc = subprocess.run(GPTFORGE + ["tokenize", "--input", str(src), "--output", str(tmp_path / "p"), "--tokenizer",
                                      str(tmp_path / "t.model"), "--text-field", "content", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(str(tmp_path / "p"))["documents"] == 60


def test_tokenizer_train_rejects_bad_vocab(tmp_path, corpus_jsonl):
    with pytest.raises(ValueError, match="--vocab-size"):
        train_tokenizer([corpus_jsonl], str(tmp_path / "t"), vocab_size=10)
    assert not list(tmp_path.iterdir())
