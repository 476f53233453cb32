"""Web readers, HTML extraction and language identification on real text: Debian's Python 3.11 HTML
docs packed as a crawl, fortune cookies in six languages, and a file mix with every kind of bad input."""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections import Counter

import pytest

from gptforge.data_prep.readers.documents import SkipLog
from gptforge.data_prep.readers.extract import ExtractConfig, extract_document
from gptforge.data_prep.filters.langid import LanguageConfig, LanguageIdentifier
from gptforge.data_prep.readers.web_document import WebDocument, content_id
from gptforge.data_prep.readers.web import InputFields, expand_inputs, iter_web_documents

from helpers.web import (FORTUNE_FOLDERS, PYTHON_DOCS, conversion_record, fortunes, http_response,
                          make_docs_warc, make_warc, warc_record, warcinfo_record, write_jsonl)

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not os.path.isdir(PYTHON_DOCS), reason="needs Debian's python3.11-doc")]


def read_all(paths, **kwargs):
    skips, ignored, docs = SkipLog(), Counter(), []
    for path in expand_inputs(list(paths)):
        docs += iter_web_documents(path, skips=skips, ignored=ignored, **kwargs)
    return docs, skips, ignored


@pytest.fixture(scope="module")
def docs_crawl(tmp_path_factory):
    return make_docs_warc(str(tmp_path_factory.mktemp("crawl") / "python-docs.warc.gz"))


def test_python_docs_crawl_is_read_and_extracted(docs_crawl):
    assert len(docs_crawl.pages) == 530 and len(docs_crawl.images) == 1
    docs, skips, ignored = read_all([docs_crawl.path])
    assert skips.total == 0, skips.summary()
    assert len(docs) == 531  # every response, HTML or not; requests and warcinfo are not documents
    assert ignored == {"warc_request": 531, "warc_warcinfo": 1}
    assert len({doc.id for doc in docs}) == 531 and all(doc.id.startswith("<urn:uuid:") for doc in docs)
    assert all(doc.html and doc.text == "" and doc.source.startswith(docs_crawl.path + "@") for doc in docs)

    reasons = Counter(extract_document(doc, ExtractConfig()) for doc in docs)
    assert reasons["not_html"] == 1
    assert reasons[None] + reasons["empty_after_extraction"] == 530 and reasons[None] >= 520
    assert all(doc.html is None for doc in docs)
    by_url = {doc.url: doc for doc in docs}
    intro = by_url[docs_crawl.url("tutorial/introduction.html")]
    assert intro.text.startswith("3. An Informal Introduction to Python")
    assert "Using Python as a Calculator" in intro.text
    assert intro.meta == {"warc_date": "2024-05-01T12:00:00Z", "http_status": 200}
    assert "defaultdict objects" in by_url[docs_crawl.url("library/collections.html")].text


def test_main_content_drops_navigation():
    with open(f"{PYTHON_DOCS}/tutorial/introduction.html", "rb") as handle:
        body = handle.read()
    texts = {}
    for main in (True, False):
        doc = WebDocument(id="x", html=body, content_type="text/html; charset=utf-8")
        assert extract_document(doc, ExtractConfig(main_content=main)) is None
        texts[main] = doc.text
    for boilerplate in ("Previous topic", "Next topic", "Report a Bug", "Show Source", "Navigation"):
        assert boilerplate in texts[False] and boilerplate not in texts[True]
    assert len(texts[True]) < len(texts[False])


def test_charset_sniffing_and_removal_reasons():
    german = "<html><body><p>Größere Übungen für Äpfel und Öfen.</p></body></html>"
    for content_type, body in [("text/html; charset=ISO-8859-1", german.encode("latin-1")),
                               ("text/html; charset=made-up", german.encode("utf-8")),
                               (None, german.encode("utf-8"))]:
        doc = WebDocument(id="x", html=body, content_type=content_type)
        assert extract_document(doc, ExtractConfig()) is None, content_type
        assert "Größere Übungen für Äpfel und Öfen." in doc.text
    russian = ('<html><head><meta charset="windows-1251"></head><body><p>Съешь же ещё этих мягких '
               'французских булок, да выпей чаю.</p></body></html>')
    doc = WebDocument(id="x", html=russian.encode("cp1251"), content_type="text/html")
    assert extract_document(doc, ExtractConfig()) is None and "мягких французских булок" in doc.text
    assert extract_document(WebDocument(id="x", html=b"\x89PNG\r\n", content_type=None), ExtractConfig()) == "not_html"
    assert extract_document(WebDocument(id="x", html=b"{}", content_type="application/json"),
                            ExtractConfig()) == "not_html"
    assert extract_document(WebDocument(id="x", html=b"<html><body> </body></html>", content_type="text/html"),
                            ExtractConfig()) == "empty_after_extraction"
    text_doc = WebDocument(id="x", text="already text")
    assert extract_document(text_doc, ExtractConfig()) is None and text_doc.text == "already text"


def test_language_identification_on_fortunes():
    identifier = LanguageIdentifier(LanguageConfig(keep=("de", "es"), min_score=0.5))
    docs = [WebDocument(id=f"{lang}{i}", text=text, meta={"true": lang})
            for lang in FORTUNE_FOLDERS for i, text in enumerate(fortunes(lang, limit=30))]
    assert Counter(doc.meta["true"] for doc in docs) == {lang: 30 for lang in FORTUNE_FOLDERS}
    reasons = Counter()
    kept = Counter()
    for doc in docs:
        reason = identifier.filter(doc)
        reasons[reason] += 1
        if reason is None:
            kept[doc.meta["true"]] += 1
        assert 0.0 <= doc.meta["language_score"] <= 1.0
    found = Counter(doc.meta["language"] for doc in docs)
    for lang in FORTUNE_FOLDERS:
        assert found[lang] >= 27, found  # at least 90% of each language is recognised
    assert set(kept) == {"de", "es"} and kept["de"] + kept["es"] >= 55
    assert reasons["language_not_kept"] >= 4 * 27
    assert sum(reasons.values()) == 180
    # The score is a probability: a bare number has no language to speak of.
    strict = LanguageIdentifier(LanguageConfig(min_score=0.9))
    assert strict.filter(WebDocument(id="n", text="12345 67 890")) == "language_score_too_low"
    with pytest.raises(ValueError, match="language.keep: unknown language code"):
        LanguageIdentifier(LanguageConfig(keep=("xx",)))
    with pytest.raises(ValueError, match="language.min_score"):
        LanguageIdentifier(LanguageConfig(min_score=1.5))


def test_wet_jsonl_zst_and_parquet_readers(tmp_path):
    texts = fortunes("de", limit=3)
    wet = make_warc(str(tmp_path / "crawl.warc.wet.gz"), [warcinfo_record()] + [
        conversion_record(f"https://example.de/{i}", text) for i, text in enumerate(texts)])
    docs, skips, ignored = read_all([wet])
    assert [doc.text for doc in docs] == texts and skips.total == 0 and ignored == {"warc_warcinfo": 1}
    assert docs[1].url == "https://example.de/1" and docs[1].html is None
    assert docs[1].meta["warc_refers_to"].startswith("<urn:uuid:")

    zst = write_jsonl(str(tmp_path / "docs.jsonl.zst"), [
        {"id": 7, "text": texts[0], "url": "https://a/", "lang": "de"}, {"text": texts[1]}])
    docs, skips, _ = read_all([zst])
    assert [(d.id, d.url, d.meta) for d in docs] == [("7", "https://a/", {"lang": "de"}),
                                                     (content_id(texts[1]), None, {})]
    assert docs[0].source == f"{zst}:1" and skips.total == 0

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = str(tmp_path / "docs.parquet")
    pq.write_table(pa.table({"content": texts, "doc_id": ["a", "b", "c"], "link": ["u1", None, "u3"],
                             "score": [1, 2, 3]}), parquet)
    fields = InputFields(text="content", id="doc_id", url="link")
    docs, skips, _ = read_all([parquet], fields=fields)
    assert [(d.id, d.url, d.text, d.meta) for d in docs] == [
        ("a", "u1", texts[0], {"score": 1}), ("b", None, texts[1], {"score": 2}), ("c", "u3", texts[2], {"score": 3})]
    assert docs[2].source == f"{parquet}:row 3"


def test_datasets_folders(tmp_path):
    from datasets import Dataset

    texts = fortunes("it", limit=4)
    saved = str(tmp_path / "saved")
    Dataset.from_dict({"text": texts[:3] + [None], "id": ["i0", "i1", "i2", "i3"]}).save_to_disk(saved)
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: other\n---\nFortunes.\n")
    with open(card / "part.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "source")] + [(t, "it") for t in texts[:2]])
    (tmp_path / "loose").mkdir()
    loose = write_jsonl(str(tmp_path / "loose" / "a.jsonl"), [{"text": texts[3]}])
    assert expand_inputs([saved, str(card), str(tmp_path / "loose")]) == sorted([saved, str(card), loose])

    docs, skips, _ = read_all([saved])
    assert [(d.id, d.text) for d in docs] == [("i0", texts[0]), ("i1", texts[1]), ("i2", texts[2])]
    assert skips.counts == {"non_string_text": 1} and skips.examples["non_string_text"] == [f"{saved}:row 4"]
    docs, skips, _ = read_all([str(card)])
    assert [(d.text, d.meta) for d in docs] == [(t, {"source": "it"}) for t in texts[:2]] and skips.total == 0
    assert docs[0].source == f"{card}[train]:row 1"


def test_expand_inputs_errors(tmp_path):
    write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "x"}])
    (tmp_path / "notes.txt").write_text("x")
    assert expand_inputs([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl")]
    with pytest.raises(ValueError, match="input '.*nothing\\*.jsonl': no such file"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(ValueError, match="notes.txt' is not a supported kind"):
        expand_inputs([str(tmp_path / "*")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no readable file"):
        expand_inputs([str(tmp_path / "empty")])


def test_bad_inputs_are_counted_and_every_valid_document_comes_through(tmp_path):
    texts = fortunes("en", limit=40)
    good = iter(texts)
    valid: set[str] = set()

    def resp(i: int, *, bad: bool = False, length_error: int = 0) -> bytes:
        """A response page with the next fortune; ``bad`` ones are not expected back."""
        text = next(good)
        if not bad:
            valid.add(text)
        block = http_response(f"<html><body><p>{text}</p></body></html>".encode(), "text/html")
        return warc_record("response", block, target_uri=f"https://example.com/{i}",
                           content_type="application/http; msgtype=response",
                           content_length=len(block) + length_error)

    # WARC, one gzip member per record: a corrupt header, a Content-Length too short, one too long
    # (swallowing the start of the next record), a gzip member that does not decompress, a 100 MB page
    # (over max_document_bytes), and a file cut inside its last record.
    broken_member = bytearray(gzip.compress(resp(90, bad=True)))
    broken_member[20:40] = b"\x00" * 20
    warc = str(tmp_path / "mixed.warc.gz")
    with open(warc, "wb") as handle:
        for record in [warcinfo_record(), resp(1), resp(2), resp(91, bad=True).replace(b"WARC/1.0", b"WARX/1.0"),
                       resp(3), resp(92, bad=True, length_error=-60), resp(4),
                       resp(93, bad=True, length_error=60), resp(5)]:
            handle.write(gzip.compress(record))
        handle.write(bytes(broken_member))
        huge = warc_record("response", http_response(b"<p>" + b"a" * (100 << 20), "text/html"),
                           target_uri="https://example.com/huge", content_type="application/http; msgtype=response")
        handle.write(gzip.compress(huge, 1))
        handle.write(gzip.compress(resp(6)))
        handle.write(gzip.compress(resp(7, bad=True))[:-60])  # the file ends inside this record
    # A plain WARC with a wrong Content-Length in the middle.
    plain = make_warc(str(tmp_path / "plain.warc"), [resp(10), resp(11, bad=True, length_error=-25), resp(12)])
    # WET with invalid UTF-8.
    wet_texts = [next(good), next(good)]
    valid.update(wet_texts)
    wet = make_warc(str(tmp_path / "crawl.wet.gz"), [conversion_record("https://w/0", wet_texts[0]),
                                                      conversion_record("https://w/1", b"caf\xe9 \xff"),
                                                      conversion_record("https://w/2", wet_texts[1])])
    # JSONL with invalid UTF-8, a non-JSON line and a record without text; a 100 MB document.
    lines = [next(good) for _ in range(3)]
    valid.update(lines)
    jsonl = write_jsonl(str(tmp_path / "mixed.jsonl"), [
        {"text": lines[0]}, b'{"text": "caf\xe9"}\n', b"not json at all\n", {"body": "no text field"},
        {"text": "x" * (100 << 20)}, {"text": lines[1]}, b"\n", {"text": lines[2]}])
    # Truncated gzip and zstd: the first member / frame is whole, the second (one long line) is cut.
    cut = [next(good) for _ in range(2)]
    valid.update(cut)
    whole_gz = gzip.compress(json.dumps({"text": cut[0]}).encode() + b"\n")
    cut_gz = gzip.compress(b'{"text": "' + os.urandom(4000).hex().encode())
    with open(tmp_path / "cut.jsonl.gz", "wb") as handle:
        handle.write(whole_gz + cut_gz[: len(cut_gz) // 2])
    import zstandard

    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": cut[1]}).encode() + b"\n"),
              zstandard.ZstdCompressor().compress(b'{"text": "' + os.urandom(4000).hex().encode())]
    with open(tmp_path / "cut.jsonl.zst", "wb") as handle:
        handle.write(frames[0] + frames[1][: len(frames[1]) // 2])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.warc.gz").write_bytes(b"")

    docs, skips, ignored = read_all([str(tmp_path)], max_document_bytes=50 << 20)
    reasons = Counter(extract_document(doc, ExtractConfig()) for doc in docs)
    assert reasons == {None: len(docs)}
    # HTML extraction collapses the fortunes' line breaks: compare words.
    assert sorted(" ".join(doc.text.split()) for doc in docs) == sorted(" ".join(t.split()) for t in valid)
    assert dict(skips.counts) == {
        "malformed_warc_record": 5,  # header, too short, too long, broken gzip member, plain file
        "document_too_large": 2,  # the WARC page and the JSONL document
        "truncated_or_corrupt_file": 3,  # WARC, gzip, zstd
        "invalid_utf8": 2,  # WET record, JSONL line
        "invalid_json": 1,
        "missing_field_text": 1,
        "empty_file": 2,
    }, skips.summary()
    assert ignored == {"warc_warcinfo": 1}
    assert skips.examples["missing_field_text"] == [f"{tmp_path}/mixed.jsonl:4"]
    assert sorted(skips.examples["invalid_utf8"]) == sorted([f"{jsonl}:2", f"{wet}@397"])
    jsonl_too_large, warc_too_large = skips.examples["document_too_large"]
    assert jsonl_too_large == f"{jsonl}:5" and warc_too_large.startswith(f"{warc}@")
    assert all(where.startswith(f"{warc}@") or where.startswith(f"{plain}@")
               for where in skips.examples["malformed_warc_record"])
