"""HTML -> main text for WARC responses (resiliparse), with a removal reason for what cannot be used.

A document read from a WARC response carries the raw HTTP body in ``html`` and the HTTP Content-Type in
``content_type``. ``extract_document`` decodes the body (the header's charset if it names a known codec,
else resiliparse's detector, which also reads ``<meta charset>``), extracts the text, sets ``doc.text``
and drops ``doc.html`` so the bytes do not travel further through the pipeline.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")

# Markers that open an HTML document, looked for in the first bytes when a response has no Content-Type.
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body")
_SNIFF_BYTES = 1024


@dataclass(kw_only=True, frozen=True)
class ExtractConfig:
    """How an HTML page becomes text (the options resiliparse's ``extract_plain_text`` offers)."""

    main_content: bool = True
    """Keep only the main content (drops navigation, headers, footers, sidebars)."""
    preserve_formatting: bool = True
    """Keep paragraph and line breaks (else all white space collapses to single spaces)."""
    list_bullets: bool = True
    """Prefix list items with bullets or numbers."""
    alt_texts: bool = False
    """Keep the alternative texts of images."""
    links: bool = False
    """Append link targets to link texts."""
    form_fields: bool = False
    """Keep form fields and their values."""
    noscript: bool = False
    """Keep the contents of ``<noscript>`` elements."""
    comments: bool = True
    """Treat comment sections as main content (with ``main_content``)."""
    skip_elements: tuple[str, ...] = ()
    """CSS selectors of further elements to drop (e.g. ``".cookie-banner"``)."""

    def validate(self) -> list[str]:
        errors = []
        if not all(isinstance(sel, str) and sel.strip() for sel in self.skip_elements):
            errors.append("extract.skip_elements: every entry must be a non-empty CSS selector string")
        return errors


def content_type_of(header: str | None) -> tuple[str | None, str | None]:
    """(media type in lower case, charset parameter) of a Content-Type header value."""
    if not header:
        return None, None
    media, *params = header.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return media.strip().lower() or None, charset


def looks_like_html(body: bytes) -> bool:
    """Sniff a body without a Content-Type: does it open like an HTML document?"""
    head = body[:_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return any(marker in head for marker in _HTML_MARKERS)


def decode_html(body: bytes, header_charset: str | None) -> str:
    """The body as text: the header's charset when Python knows it, else a detected encoding."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    encoding = None
    if header_charset:
        try:
            encoding = codecs.lookup(header_charset).name
        except LookupError:  # servers send made-up charsets; fall back to detection
            encoding = None
    if encoding is None:
        encoding = detect_encoding(body, from_html_meta=True)
    # bytes_to_str falls back to UTF-8 / Windows-1252 and never raises on bad bytes.
    return bytes_to_str(body, encoding)


def extract_text(html: str, cfg: ExtractConfig) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    return extract_plain_text(
        tree,
        preserve_formatting=cfg.preserve_formatting,
        main_content=cfg.main_content,
        list_bullets=cfg.list_bullets,
        alt_texts=cfg.alt_texts,
        links=cfg.links,
        form_fields=cfg.form_fields,
        noscript=cfg.noscript,
        comments=cfg.comments,
        skip_elements=list(cfg.skip_elements) or None,
    )


def extract_document(doc, cfg: ExtractConfig) -> str | None:
    """Turn ``doc.html`` into ``doc.text`` (and clear ``doc.html``). Returns None when the document is
    kept, else the removal reason: ``not_html``, ``html_parse_error`` or ``empty_after_extraction``.
    A document that already has text and no HTML (JSONL, WET, ...) is kept as it is."""
    from resiliparse.parse.html import HTMLParserException

    if doc.html is None:
        return None if doc.text.strip() else "empty_after_extraction"
    body, doc.html = doc.html, None
    media, charset = content_type_of(doc.content_type)
    if media is None:
        if not looks_like_html(body):
            return "not_html"
    elif media not in HTML_CONTENT_TYPES:
        return "not_html"
    try:
        text = extract_text(decode_html(body, charset), cfg)
    except HTMLParserException:
        return "html_parse_error"
    if not text.strip():
        return "empty_after_extraction"
    doc.text = text
    return None
