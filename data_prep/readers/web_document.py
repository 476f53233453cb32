"""The document that flows through the corpus stages (read -> extract -> filter -> dedup -> write).

A reader fills ``id`` (stable: the record's own id, else a hash of the content), ``url`` when known,
and either ``text`` (JSONL, Parquet, WET, ``datasets``) or ``html`` (a WARC response body, until the
extract stage turns it into ``text``). Every other field of an input record travels in ``meta`` and is
written back out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash


@dataclass(kw_only=True, slots=True)
class WebDocument:
    id: str
    """Stable across reruns: from the record (``id`` field, WARC-Record-ID), else ``content_id``."""
    text: str = ""
    """Plain text ("" until extraction for an HTML response)."""
    url: str | None = None
    html: bytes | None = None
    """Raw HTTP body of a WARC response (dropped once extracted)."""
    content_type: str | None = None
    """The HTTP Content-Type header of a WARC response (with its charset parameter, if any)."""
    source: str = ""
    """Where it was read: ``file:line``, ``file:row N`` or ``file@offset``."""
    meta: dict = field(default_factory=dict)
    """The input record's other fields, plus what stages add (``language``, ``language_score``,
    ``quality_score`` ...)."""

    def to_record(self) -> dict:
        """The JSON-able record written to output shards: input fields first, then ours."""
        record = dict(self.meta)
        record["id"] = self.id
        record["text"] = self.text
        if self.url is not None:
            record["url"] = self.url
        return record


def content_id(content: str | bytes) -> str:
    """A stable id from the content itself (xxh3-128, hex) for records that carry none."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    return xxhash.xxh3_128_hexdigest(data)
