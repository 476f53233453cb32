"""GPT-3 Appendix C decontamination, one rule at a time: a 13-gram match removes itself and 200
characters on each side; pieces under 200 characters go; documents split into more than 10 pieces go;
13-grams found in more than 10 training documents are ignored; case and punctuation do not hide a match.
Plus the phases' files (benchmark n-grams, per-shard counts) and their errors."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from gptforge.data_prep.filters.decontaminate import (BenchmarkNgrams, DecontaminationConfig, Decontaminator,
                                              NgramDocumentCounts, count_ngram_documents, decontaminate,
                                              decontaminate_details, normalized_words)
from gptforge.data_prep.readers.web_document import WebDocument

pytestmark = pytest.mark.unit

QUESTION = "Which planet in the solar system has the largest number of known moons orbiting it today"
ANSWER = "Saturn has the largest number of known moons of any planet in the solar system as of now"
OTHER = "The committee agreed that every member should vote on the final budget before the end of March"
GRAM = " ".join(QUESTION.split()[:13])  # exactly one benchmark 13-gram


def prose(chars: int, start: int = 0) -> str:
    """Exactly ``chars`` characters of distinct filler words (letters n..z, never benchmark words),
    with no whitespace at either end."""
    letters = "nopqrstuvwxyz"
    out, i = [], start * 1000
    while sum(len(w) + 1 for w in out) < chars + 1:
        index, word = i, ""
        for _ in range(6):
            index, digit = divmod(index, len(letters))
            word += letters[digit]
        out.append(word)
        i += 1
    text = " ".join(out)[:chars]
    return text[:-1] + "x" if text.endswith(" ") else text


def cut(text: str, first: str, last: str | None = None, context: int = 200) -> list[str]:
    """The pieces the rule predicts: ``text`` without [start of ``first`` - context, end of ``last`` +
    context), each side stripped."""
    start = text.index(first)
    end = text.index(last or first, start) + len(last or first)
    return [p for p in (text[:max(0, start - context)].strip(), text[end + context:].strip()) if p]


def write_benchmark(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return str(path)


@pytest.fixture
def ngrams(tmp_path) -> BenchmarkNgrams:
    path = write_benchmark(tmp_path / "bench.jsonl", [
        {"id": "q1", "question": QUESTION, "choices": [ANSWER, "Jupiter"], "label": 2},
        {"id": "q2", "question": OTHER, "choices": []},
    ])
    return BenchmarkNgrams.from_files([path])


def test_match_removes_ngram_and_200_chars_each_side(ngrams):
    left, right = prose(700, 1), prose(700, 2)
    text = f"{left} {GRAM} {right}"
    pieces, reason = decontaminate(text, ngrams)
    assert reason is None
    assert pieces == cut(text, GRAM) and len(pieces) == 2
    assert pieces[0].startswith(left[:400]) and pieces[1].endswith(right[-400:])
    # 13-gram + 2 * 200 removed, give or take the whitespace stripped at the cuts.
    assert len(GRAM) + 400 <= len(text) - sum(map(len, pieces)) <= len(GRAM) + 404
    # Twelve words of the benchmark are no 13-gram: nothing happens.
    twelve = " ".join(QUESTION.split()[:12])
    clean = f"{left} {twelve} {right}"
    assert decontaminate(clean, ngrams) == ([clean], None)


def test_context_is_configurable(ngrams):
    left, right = prose(700, 1), prose(700, 2)
    text = f"{left} {GRAM} {right}"
    pieces, _ = decontaminate(text, ngrams, cfg=DecontaminationConfig(context_chars=50))
    assert pieces == cut(text, GRAM, context=50)
    assert len(GRAM) + 100 <= len(text) - sum(map(len, pieces)) <= len(GRAM) + 104


@pytest.mark.parametrize("left_chars, kept", [(200, True), (199, False)])
def test_pieces_under_200_chars_are_dropped(ngrams, left_chars, kept):
    # The left piece is what precedes the 200 removed characters: ``left_chars`` of prose.
    text = f"{prose(left_chars, 1)} {prose(198, 3)} {GRAM} {prose(900, 2)}"
    result = decontaminate_details(text, ngrams)
    assert result.reason is None and result.matches == 1 and result.split_pieces == 2
    assert result.pieces == (cut(text, GRAM) if kept else cut(text, GRAM)[1:])
    assert len(cut(text, GRAM)[0]) == left_chars
    assert result.short_pieces == (0 if kept else 1)


def test_document_whose_pieces_are_all_short_is_dropped(ngrams):
    text = f"{prose(250, 1)} {GRAM} {prose(250, 2)}"
    assert decontaminate(text, ngrams) == ([], "decontamination_short_pieces")


@pytest.mark.parametrize("matches, dropped", [(9, False), (10, True)])
def test_documents_split_into_more_than_10_pieces_are_dropped(ngrams, matches, dropped):
    # Matches 700 characters apart: each gap leaves a 700 - 2 * 200 character piece, plus both ends.
    parts = [prose(700, 0)]
    for k in range(matches):
        parts += [GRAM, prose(700, k + 1)]
    result = decontaminate_details(" ".join(parts), ngrams)
    assert result.split_pieces == matches + 1
    if dropped:
        assert (result.pieces, result.reason) == ([], "decontamination_too_many_pieces")
    else:
        assert result.reason is None and len(result.pieces) == 10
        assert all(len(p) >= 200 for p in result.pieces)


def test_overlapping_matches_merge_into_one_cut(ngrams):
    # The whole question holds four overlapping 13-grams; with the answer 300 characters later the
    # removed spans overlap too: one cut, two pieces.
    text = f"{prose(500, 1)} {QUESTION} {prose(300, 2)} {ANSWER} {prose(500, 3)}"
    result = decontaminate_details(text, ngrams)
    assert result.matches == 4 + 6 and result.split_pieces == 2
    assert result.pieces == cut(text, QUESTION, ANSWER)


def test_case_and_punctuation_do_not_hide_a_match(ngrams):
    words, spans = normalized_words("WHICH planet, -- “Solar-System” don't!")
    assert words == ["which", "planet", "solarsystem", "dont"]
    assert spans == [(0, 5), (6, 13), (17, 31), (32, 38)]
    text = f"{prose(600, 1)} {OTHER.upper().replace(' ', ' -- ')}. {prose(600, 2)}"
    result = decontaminate_details(text, ngrams)
    assert result.matches == 5  # the 17-word OTHER: 5 13-grams, found through case and "--" tokens
    punctuated = (f"{prose(600, 1)} Which planet in the solar system, has: the largest (number) of known moons! "
                  f"{prose(600, 2)}")
    assert decontaminate_details(punctuated, ngrams).matches == 1
    changed = f"{prose(600, 1)} Which planet in the solar system has the biggest number of known moons {prose(600, 2)}"
    assert decontaminate_details(changed, ngrams).matches == 0


def test_ngrams_in_more_than_10_training_documents_are_ignored(ngrams, tmp_path):
    common = f"{prose(500, 1)} {GRAM} {prose(500, 2)} {GRAM} {prose(300, 3)}"  # twice: still one document
    rare = f"{prose(500, 1)} {OTHER} {prose(500, 2)}"
    shard_paths = []
    for shard, texts in enumerate([[common] * 6 + [rare] * 5, [common] * 5 + [rare] * 5 + [prose(900, 4)]]):
        path = str(tmp_path / f"counts-{shard}.npz")
        count_ngram_documents(texts, ngrams).save(path)
        shard_paths.append(path)
    merged = NgramDocumentCounts.merge_files(shard_paths)
    assert merged.documents == 22
    ignored = merged.ignored(ngrams)  # GRAM: 11 documents (ignored); OTHER's 13-grams: 10 documents (kept)
    assert len(ignored) == 1
    assert decontaminate(common, ngrams, ignored) == ([common], None)
    assert decontaminate(common, ngrams)[0] != [common]
    assert decontaminate(rare, ngrams, ignored) == (cut(rare, OTHER), None)
    assert len(merged.ignored(ngrams, max_documents=11)) == 0

    decontaminator = Decontaminator(ngrams, ignored)
    assert decontaminator.ngrams_ignored == 1
    out = decontaminator(WebDocument(id="c", text=common))
    out += decontaminator(WebDocument(id="r", text=rare, meta={"lang": "en"}))
    assert out[0].id == "c" and out[0].text == common
    assert [d.id for d in out[1:]] == ["r/0", "r/1"]
    assert out[1].meta == {"lang": "en", "decontaminated_from": "r"}
    assert decontaminator.counts == Counter({"documents": 2, "documents_contaminated": 1, "ngram_matches": 5,
                                             "ngram_matches_ignored": 2, "pieces_kept": 2})


def test_decontaminator_counts_dropped_documents_and_pieces(ngrams):
    decontaminator = Decontaminator(ngrams)
    many = " ".join([prose(700, 0)] + [f"{GRAM} {prose(700, k + 1)}" for k in range(10)])
    short = f"{prose(250, 1)} {GRAM} {prose(250, 2)}"
    one_short = f"{prose(100, 1)} {GRAM} {prose(700, 2)}"
    assert decontaminator(WebDocument(id="m", text=many)) == []
    assert decontaminator(WebDocument(id="s", text=short)) == []
    assert [d.id for d in decontaminator(WebDocument(id="o", text=one_short))] == ["o/0"]
    worker = Decontaminator(ngrams)
    worker(WebDocument(id="x", text=prose(400)))
    decontaminator.merge(worker.counts)
    assert decontaminator.counts == Counter({
        "documents": 4, "documents_contaminated": 3, "ngram_matches": 12, "pieces_kept": 1,
        "pieces_dropped_short": 2, "documents_dropped:decontamination_too_many_pieces": 1,
        "documents_dropped:decontamination_short_pieces": 1})


def test_benchmark_fields_files_and_errors(tmp_path):
    path = write_benchmark(tmp_path / "bench.jsonl", [
        {"question": QUESTION, "answer": ANSWER},
        {"answer": OTHER},
        {"question": 42, "answer": "short"},
    ], extra_lines=["{broken", "[1, 2]"])
    everything = BenchmarkNgrams.from_files([path])
    assert everything.n == 13 and everything.records == 3
    assert len(everything) == 4 + 6 + 5  # every string field: 16-, 18- and 17-word texts
    assert everything.skipped == {"invalid_json": 1, "not_an_object": 1}
    questions = BenchmarkNgrams.from_files([path], fields=["question"])
    assert len(questions) == 4
    assert questions.skipped == {"invalid_json": 1, "not_an_object": 1, "missing_field_question": 1,
                                 "non_string_question": 1}
    assert len(BenchmarkNgrams.from_files([path], fields=["question"], n=8)) == 9

    saved = str(tmp_path / "out" / "ngrams.npz")
    everything.save(saved)
    loaded = BenchmarkNgrams.load(saved)
    assert loaded.fingerprint == everything.fingerprint and np.array_equal(loaded.hashes, everything.hashes)
    assert loaded.sources == [path] and loaded.skipped == everything.skipped
    assert os.listdir(tmp_path / "out") == ["ngrams.npz"]

    with pytest.raises(ValueError, match="benchmark file .*missing.jsonl"):
        BenchmarkNgrams.from_files([path, str(tmp_path / "missing.jsonl")])
    (tmp_path / "bench.txt").write_text("x")
    with pytest.raises(ValueError, match="benchmark file .*bench.txt.*expected one of"):
        BenchmarkNgrams.from_files([str(tmp_path / "bench.txt")])
    with pytest.raises(ValueError, match="not a gptforge-benchmark-ngrams-v1"):
        BenchmarkNgrams.load(str(tmp_path / "bench.txt"))
    count_ngram_documents([QUESTION], questions).save(str(tmp_path / "a.npz"))
    count_ngram_documents([QUESTION], everything).save(str(tmp_path / "b.npz"))
    with pytest.raises(ValueError, match="count file .*b.npz.*another benchmark n-gram set"):
        NgramDocumentCounts.merge_files([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
