"""Dedup keys: the normalised URL (URL dedup), the normalised text and its 128-bit hash (exact dedup),
and a record's id."""

from __future__ import annotations

import unicodedata
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import xxhash

from ..readers.web_document import content_id
from .config import DedupConfig
from .minhash import WordSpans

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "ws": 80, "wss": 443}
_MASK64 = (1 << 64) - 1


def normalize_url(url: str) -> str:
    """The URL dedup key. Rules: surrounding whitespace stripped; scheme and host lowercased; the default
    port of the scheme (http 80, https 443, ftp 21, ws 80, wss 443) dropped; the fragment dropped;
    trailing slashes of the path dropped (``http://a.org/`` == ``http://a.org``); query parameters
    decoded, sorted by name then value and re-encoded (blank values kept). The path keeps its case."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a non-numeric or out-of-range port: keep the netloc as written (lowercased)
        host, port = None, None
    if host is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
        netloc = (f"{userinfo}@" if userinfo else "") + host
        if port is not None and _DEFAULT_PORTS.get(scheme) != port:
            netloc += f":{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), query, ""))


def normalize_text(text: str) -> bytes:
    """The exact-dedup key text and the fuzzy shingle source: NFKC, lowercase, whitespace runs -> one
    space, stripped; UTF-8. Its space-separated words are the words of the shingles."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split()).encode("utf-8")


# ASCII whitespace of ``str.split`` (\t \n \v \f \r and the separators 0x1c-0x1f) -> space
_ASCII_SPACES = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)


def prenormalize_text(text: str) -> bytes:
    """``normalize_text`` but for its whitespace collapse, which ``split_words`` makes unnecessary: the
    same words (maximal runs of non-space bytes). For an ASCII text (most of a web corpus), NFKC and
    lowercase, then its whitespace bytes become spaces in one ``bytes.translate``; the per-word split
    and join of ``normalize_text`` cost ~19 us per 400-word document, a third of phase 1's work after
    JSON parsing.
    Other texts get ``normalize_text`` itself (Unicode whitespace needs ``str.split``)."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    if lowered.isascii():
        return lowered.encode("ascii").translate(_ASCII_SPACES)
    return " ".join(lowered.split()).encode("utf-8")


def exact_keys(spans: WordSpans) -> list[tuple[int, int]]:
    """The exact-dedup key of every text of a batch: the xxh3-128 of its ``normalize_text`` bytes, i.e.
    its words joined by single spaces, cut out of the batch buffer (the other spaces dropped)."""
    data = np.frombuffer(spans.buffer, dtype=np.uint8)  # [n_bytes + 9]
    keep = data != 32  # [n_bytes + 9] word bytes ...
    keep[len(data) - 8:] = False  # ... but the zero padding
    first = np.cumsum(spans.counts) - spans.counts  # [n_docs] index of each text's first word
    later = np.ones(len(spans.starts), dtype=bool)  # [n_words] words after their text's first
    later[first[spans.counts > 0]] = False
    keep[spans.starts[later] - 1] = True  # one space before each of them
    collapsed = memoryview(data[keep].tobytes())  # the normalised texts back to back
    word_bytes = np.concatenate(([0], np.cumsum(spans.lengths)))  # [n_words + 1]
    ends = np.cumsum(spans.counts)  # [n_docs] one past each text's last word
    sizes = word_bytes[ends] - word_bytes[first] + np.maximum(spans.counts - 1, 0)  # [n_docs] bytes
    offsets = np.concatenate(([0], np.cumsum(sizes))).tolist()
    return [hash128(collapsed[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def hash128(data: bytes) -> tuple[int, int]:
    value = xxhash.xxh3_128_intdigest(data)
    return value >> 64, value & _MASK64


def record_id(record: dict, config: DedupConfig) -> str:
    value = record.get(config.id_field)
    if value is None or isinstance(value, (dict, list)):
        return content_id(record[config.text_field])
    return str(value)
