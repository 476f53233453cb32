"""Builders of web-corpus test inputs from real text on the machine: WARC / WET files written byte by
byte (so tests can also damage them), Debian's Python 3.11 HTML docs (package python3.11-doc) packed as
a crawl, and fortune cookies in several languages (packages fortunes, fortunes-de, -es, -it, -pl, -ru).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterable

PYTHON_DOCS = "/usr/share/doc/python3.11/html"
DOCS_URL = "https://docs.python.org/3.11/"
FORTUNES = "/usr/share/games/fortunes"
# language code -> folder of fortune files (English ones lie at the top level).
FORTUNE_FOLDERS = {"en": FORTUNES, "de": f"{FORTUNES}/de", "es": f"{FORTUNES}/es", "it": f"{FORTUNES}/it",
                   "pl": f"{FORTUNES}/pl", "ru": f"{FORTUNES}/ru"}


def record_id(*parts: str) -> str:
    """A WARC-Record-ID that is the same on every run for the same parts."""
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '|'.join(parts))}>"


def warc_record(warc_type: str, block: bytes, *, target_uri: str | None = None, rec_id: str | None = None,
                content_type: str | None = None, extra_headers: dict[str, str] | None = None,
                content_length: int | None = None, version: str = "WARC/1.0") -> bytes:
    """One WARC record. ``content_length`` overrides the true block length (to write a wrong one);
    ``version`` overrides the first line (to write a corrupt header)."""
    headers = {"WARC-Type": warc_type,
               "WARC-Record-ID": rec_id or record_id(warc_type, target_uri or "", str(len(block))),
               "WARC-Date": "2024-05-01T12:00:00Z"}
    if target_uri is not None:
        headers["WARC-Target-URI"] = target_uri
    if content_type is not None:
        headers["Content-Type"] = content_type
    headers.update(extra_headers or {})
    headers["Content-Length"] = str(len(block) if content_length is None else content_length)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{version}\r\n{head}\r\n".encode("utf-8") + block + b"\r\n\r\n"


def http_response(body: bytes, content_type: str | None, *, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


def response_record(url: str, body: bytes, content_type: str | None = "text/html; charset=utf-8",
                    **kwargs) -> bytes:
    return warc_record("response", http_response(body, content_type), target_uri=url,
                       content_type="application/http; msgtype=response", **kwargs)


def request_record(url: str) -> bytes:
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
    block = f"GET {path} HTTP/1.1\r\nHost: docs.python.org\r\nUser-Agent: gptforge-test\r\n\r\n".encode()
    return warc_record("request", block, target_uri=url, content_type="application/http; msgtype=request")


def warcinfo_record(name: str = "test.warc.gz") -> bytes:
    block = b"software: gptforge tests\r\nformat: WARC File Format 1.0\r\n"
    return warc_record("warcinfo", block, content_type="application/warc-fields",
                       extra_headers={"WARC-Filename": name})


def conversion_record(url: str, text: str | bytes) -> bytes:
    """A WET ``conversion`` record (``text`` as bytes to write invalid UTF-8)."""
    block = text.encode("utf-8") if isinstance(text, str) else text
    return warc_record("conversion", block, target_uri=url, content_type="text/plain",
                       extra_headers={"WARC-Refers-To": record_id("response", url)})


def make_warc(path: str, records: Iterable[bytes]) -> str:
    """Write records to ``path``: one gzip member per record for a ``.gz`` path (as crawlers do),
    plain otherwise. Returns the path."""
    with open(path, "wb") as handle:
        for record in records:
            handle.write(gzip.compress(record, compresslevel=1) if path.endswith(".gz") else record)
    return str(path)


def python_doc_pages() -> list[str]:
    """Relative paths of every HTML page of the python3.11-doc package, sorted."""
    pages = glob.glob(f"{PYTHON_DOCS}/**/*.html", recursive=True)
    return sorted(os.path.relpath(page, PYTHON_DOCS) for page in pages)


@dataclass(kw_only=True)
class DocsCrawl:
    path: str
    pages: list[str]
    """Relative paths of the HTML pages written as ``text/html`` responses."""
    images: list[str]
    """Relative paths of the images written as ``image/png`` responses."""
    records: dict[str, int] = field(default_factory=dict)
    """WARC-Type -> number of records written."""

    def url(self, page: str) -> str:
        return DOCS_URL + page


def make_docs_warc(path: str, *, pages: list[str] | None = None, images: int = 1) -> DocsCrawl:
    """A crawl of the Python docs: a warcinfo record, then a request and a response per page (HTML as
    served, ``text/html; charset=utf-8``), plus ``images`` PNGs from ``_images/`` as non-HTML responses."""
    pages = python_doc_pages() if pages is None else pages
    pngs = sorted(glob.glob(f"{PYTHON_DOCS}/_images/*.png"))[:images]
    crawl = DocsCrawl(path=str(path), pages=pages, images=[os.path.relpath(p, PYTHON_DOCS) for p in pngs])
    records = [warcinfo_record(os.path.basename(path))]
    for rel, content_type in [(p, "text/html; charset=utf-8") for p in pages] + \
                             [(p, "image/png") for p in crawl.images]:
        with open(os.path.join(PYTHON_DOCS, rel), "rb") as handle:
            body = handle.read()
        records += [request_record(crawl.url(rel)), response_record(crawl.url(rel), body, content_type)]
    crawl.records = {"warcinfo": 1, "request": len(records) // 2, "response": len(records) // 2}
    make_warc(path, records)
    return crawl


def fortunes(language: str, *, min_chars: int = 150, limit: int = 40) -> list[str]:
    """Up to ``limit`` prose fortunes of at least ``min_chars`` characters in ``language`` (a key of
    ``FORTUNE_FOLDERS``), in file order. Fortune files separate entries with a line ``%``; entries
    that are mostly not letters (ASCII art, tables) are left out, having no language to find."""
    folder = FORTUNE_FOLDERS[language]
    found: list[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) or name.endswith((".dat", ".u8")) or os.path.islink(path):
            continue
        with open(path, encoding="utf-8", errors="strict") as handle:
            entries = handle.read().split("\n%\n")
        found += [entry.strip() for entry in entries if len(entry.strip()) >= min_chars
                  and sum(ch.isalpha() for ch in entry) >= 0.7 * len(entry.strip())]
        if len(found) >= limit:
            break
    return found[:limit]


def write_jsonl(path: str, records: Iterable[dict | bytes]) -> str:
    """Write records as JSON lines (``bytes`` items are written as they are, to plant bad lines);
    ``.gz`` and ``.zst`` paths are compressed. Returns the path."""
    data = b"".join(item if isinstance(item, bytes) else json.dumps(item).encode("utf-8") + b"\n"
                    for item in records)
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)
