"""WARC and WET files (read with FastWARC), recovering from records FastWARC cannot parse.

Every bad record is counted in the ``SkipLog`` with its file and byte offset and never stops the read;
``iter_warc`` describes the recovery.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from .documents import SkipLog
from .web_document import WebDocument, content_id

WARC_SUFFIXES = (".warc", ".warc.gz")
WET_SUFFIXES = (".wet", ".wet.gz")  # also matches Common Crawl's ``.warc.wet.gz``

_WARC_MAGIC = b"WARC/1."
_GZIP_MAGIC = b"\x1f\x8b\x08"
_CHUNK = 1 << 20
_MAX_WARC_HEADER = 1 << 20
_RECORD_TRAILER = b"\r\n\r\n"

# (kind, payload) of one WARC record: ("doc", WebDocument), ("skip", reason), ("ignore", counter name),
# or ("short", None) for a record that ended before its Content-Length.
_Outcome = tuple[str, object]


def iter_warc(path: str, skips: SkipLog, max_document_bytes: int, ignored: Counter) -> Iterator[WebDocument]:
    """Documents of a WARC (``response`` records with an HTTP body) or WET file (``conversion`` records).

    FastWARC stops at the first record it cannot parse (a corrupt header, a gzip member that does not
    decompress), and does not notice a Content-Length that is too long (the record swallows the records
    after it, or comes back short at the end of the file). So:

    * a record's outcome is only settled once FastWARC has parsed the record after it, or ended cleanly;
    * when FastWARC fails, the last record it returned is checked on its own (``_record_end``): if its
      Content-Length frames it exactly it is settled and the failure lies after it, else it is the bad
      record. The bad record is counted as ``malformed_warc_record`` and reading restarts at the next
      record start after it (``_next_record_start``);
    * a record shorter than its Content-Length is ``truncated_or_corrupt_file`` when no record start
      follows it (the file was cut), else ``malformed_warc_record``, and reading restarts after it.

    A record start is a gzip member that opens with ``WARC/1.`` in a ``.gz`` file, or a line opening
    with ``WARC/1.`` in a plain file. A ``.gz`` file with one member per record (what the WARC standard
    recommends and crawlers write) loses only the bad record; in a file compressed as one stream the
    rest of the stream after a failure cannot be reached and is counted as that one failure.
    """
    gz = path.endswith(".gz")
    with open(path, "rb") as handle:
        offset: int | None = 0
        while offset is not None:
            offset = yield from _warc_run(handle, path, offset, gz, skips, max_document_bytes, ignored)


def _settle(outcome: _Outcome, where: str, skips: SkipLog, ignored: Counter) -> Iterator[WebDocument]:
    kind, value = outcome
    if kind == "doc":
        yield value
    elif kind == "skip":
        skips.add(value, where)
    else:
        ignored[value] += 1


def _warc_run(handle, path: str, offset: int, gz: bool, skips: SkipLog, max_document_bytes: int,
              ignored: Counter):
    """Read records from ``offset`` on; returns None at the end of the file, else where to restart."""
    from fastwarc.warc import ArchiveIterator

    handle.seek(offset)
    pending: tuple[int, _Outcome] | None = None  # the last record read, not yet confirmed
    current: int | None = None  # the record being read
    try:
        for record in ArchiveIterator(handle, parse_http=True):
            current = record.stream_pos
            if pending is not None:
                yield from _settle(pending[1], f"{path}@{pending[0]}", skips, ignored)
                pending = None
            outcome = _warc_outcome(record, path, current, max_document_bytes)
            if outcome[0] == "short":
                restart = _next_record_start(handle, current + 1, gz)
                reason = "truncated_or_corrupt_file" if restart is None else "malformed_warc_record"
                skips.add(reason, f"{path}@{current} (shorter than its Content-Length)")
                return restart
            pending, current = (current, outcome), None
    except OSError as err:  # FastWARC's error for anything it cannot parse or decompress
        if current is not None:
            bad_at = current
        elif pending is not None:
            end = _record_end(handle, pending[0], gz)
            if end is not None:
                yield from _settle(pending[1], f"{path}@{pending[0]}", skips, ignored)
                bad_at = end
            else:
                bad_at = pending[0]
        else:
            bad_at = offset
        skips.add("malformed_warc_record", f"{path}@{bad_at} ({err})")
        return _next_record_start(handle, bad_at + 1, gz)
    if pending is not None:
        yield from _settle(pending[1], f"{path}@{pending[0]}", skips, ignored)
    return None


def _warc_outcome(record, path: str, start: int, max_document_bytes: int) -> _Outcome:
    from fastwarc.warc import WarcRecordType

    headers = record.headers
    declared = headers.get("Content-Length")
    if declared is None or not declared.strip().isdigit():
        return "short", None  # FastWARC hands back a header-less record where a file was cut
    kind = record.record_type
    if kind not in (WarcRecordType.response, WarcRecordType.conversion):
        # Read to the end anyway: a short body here means a cut file or a wrong Content-Length too.
        return ("short", None) if record.consume() < record.content_length else ("ignore", f"warc_{kind}")
    http = record.http_headers if kind == WarcRecordType.response else None
    if kind == WarcRecordType.response and (not record.is_http or http is None):
        return ("short", None) if record.consume() < record.content_length else ("skip", "warc_response_not_http")
    length = record.content_length
    if length > max_document_bytes:
        return ("short", None) if record.consume() < length else ("skip", "document_too_large")
    body = record.reader.read()
    if len(body) < length:
        return "short", None
    meta = {"warc_date": headers.get("WARC-Date")}
    where = f"{path}@{start}"
    if http is not None:
        meta["http_status"] = http.status_code
        doc = WebDocument(id=record.record_id or content_id(body), url=headers.get("WARC-Target-URI"),
                          html=body, content_type=http.get("Content-Type"), source=where, meta=meta)
        return "doc", doc
    try:
        text = body.decode("utf-8")  # WET conversion records are UTF-8 by definition
    except UnicodeDecodeError:
        return "skip", "invalid_utf8"
    if headers.get("WARC-Refers-To"):
        meta["warc_refers_to"] = headers.get("WARC-Refers-To")
    return "doc", WebDocument(id=record.record_id or content_id(text), url=headers.get("WARC-Target-URI"),
                              text=text, content_type=headers.get("Content-Type"), source=where, meta=meta)


def _content_length(header_block: bytes) -> int | None:
    for line in header_block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


def _record_end(handle, start: int, gz: bool) -> int | None:
    """The offset just past the record at ``start`` if its Content-Length frames it exactly (block
    followed by the CRLF CRLF trailer, then the end of the file or the next record / gzip member)."""
    handle.seek(start)
    if not gz:
        head = handle.read(_MAX_WARC_HEADER)
        split = head.find(b"\r\n\r\n")
        declared = _content_length(head[:split]) if split >= 0 else None
        if declared is None:
            return None
        end = start + split + 4 + declared + len(_RECORD_TRAILER)
        handle.seek(end - len(_RECORD_TRAILER))
        after = handle.read(len(_RECORD_TRAILER) + len(_WARC_MAGIC))
        framed = after[:4] == _RECORD_TRAILER and after[4:] in (b"", _WARC_MAGIC)
        return end if framed else None
    import zlib

    decoder, pos, head, total, needed, tail = zlib.decompressobj(31), start, b"", 0, None, b""
    while True:
        chunk = handle.read(_CHUNK)
        if not chunk:
            return None
        try:
            out = decoder.decompress(chunk)
        except zlib.error:
            return None
        total += len(out)
        tail = (tail + out)[-len(_RECORD_TRAILER):]
        if needed is None:
            head += out
            split = head.find(b"\r\n\r\n")
            if split >= 0:
                declared = _content_length(head[:split])
                if declared is None:
                    return None
                needed, head = split + 4 + declared + len(_RECORD_TRAILER), b""
            elif len(head) > _MAX_WARC_HEADER:
                return None
        if needed is not None and total > needed:
            return None  # more than one record in this member: cannot be framed on its own
        if decoder.eof:
            framed = needed is not None and total == needed and tail == _RECORD_TRAILER
            return pos + len(chunk) - len(decoder.unused_data) if framed else None
        pos += len(chunk)


def _opens_record(handle, candidate: int, gz: bool) -> bool:
    if not gz:
        if candidate == 0:
            return True
        handle.seek(candidate - 1)
        return handle.read(1) == b"\n"
    import zlib

    handle.seek(candidate)
    try:
        return zlib.decompressobj(31).decompress(handle.read(4096)).startswith(_WARC_MAGIC)
    except zlib.error:
        return False


def _next_record_start(handle, start: int, gz: bool) -> int | None:
    """The first record start at or after ``start`` (see ``iter_warc``), or None."""
    marker = _GZIP_MAGIC if gz else _WARC_MAGIC
    pos = start
    while True:
        handle.seek(pos)
        chunk = handle.read(_CHUNK)
        hit = chunk.find(marker)
        while hit >= 0:
            if _opens_record(handle, pos + hit, gz):
                return pos + hit
            hit = chunk.find(marker, hit + 1)
        if len(chunk) < _CHUNK:
            return None
        pos += len(chunk) - len(marker) + 1  # overlap: a marker may straddle two chunks
