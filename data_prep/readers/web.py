"""Readers for every input kind of the corpus pipeline, each yielding ``WebDocument``s.

Kinds, by suffix: WARC and WET (``.warc``, ``.warc.gz``, ``.wet``, ``.wet.gz``; read with FastWARC), JSONL
(``.jsonl``/``.json``, plain, ``.gz`` or ``.zst``), Parquet, and a local Hugging Face ``datasets`` folder
(a saved dataset, read with ``load_from_disk``, or a folder with a dataset card ``README.md`` whose data
files ``load_dataset`` reads; never anything remote).

Every bad input is counted in the ``SkipLog`` with its file and line, row or byte offset and never stops
the read. WARC records FastWARC cannot parse are recovered from as ``_iter_warc`` describes.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from .documents import JSONL_SUFFIXES, PARQUET_SUFFIXES, SkipLog, iter_records
from .web_document import WebDocument, content_id

WARC_SUFFIXES = (".warc", ".warc.gz")
WET_SUFFIXES = (".wet", ".wet.gz")  # also matches Common Crawl's ``.warc.wet.gz``
FILE_SUFFIXES = WARC_SUFFIXES + WET_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

DEFAULT_MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
"""10 MiB: far above any real page's text, far below what would strain a worker's memory."""

_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_DATASET_CARD = "README.md"


@dataclass(kw_only=True, frozen=True)
class InputFields:
    """Names of the record fields (JSONL, Parquet, ``datasets``) that hold a document's parts."""

    text: str = "text"
    """The document text; records without it are skipped (``missing_field_<name>``)."""
    id: str = "id"
    """The stable document id; records without it get the ``content_id`` of their text."""
    url: str = "url"
    """The source URL, if the records carry one."""

    def validate(self) -> list[str]:
        errors = [f"fields.{name}: must be a non-empty string"
                  for name in ("text", "id", "url") if not getattr(self, name)]
        if len({self.text, self.id, self.url}) < 3:
            errors.append(f"fields: text, id and url must be different fields "
                          f"(got {self.text!r}, {self.id!r}, {self.url!r})")
        return errors


def is_datasets_folder(path: str) -> bool:
    """A saved dataset (``save_to_disk``) or a dataset folder with a card: read as one input."""
    if not os.path.isdir(path):
        return False
    return any(os.path.isfile(os.path.join(path, name))
               for name in _SAVED_DATASET_MARKERS + (_DATASET_CARD,))


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files, globs and directories -> the sorted, de-duplicated inputs to read. A ``datasets`` folder
    is one input; any other directory stands for the readable files below it. Raises ``ValueError``
    naming the pattern when nothing matches, or the file when its kind is not supported."""
    inputs: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise ValueError(f"input {pattern!r}: no such file, directory or glob match")
        for match in matches:
            if is_datasets_folder(match):
                inputs.append(match)
            elif os.path.isdir(match):
                found = _files_below(match)
                if not found:
                    raise ValueError(f"input {pattern!r}: directory {match!r} holds no readable file "
                                     f"({', '.join(FILE_SUFFIXES)})")
                inputs.extend(found)
            elif match.endswith(FILE_SUFFIXES):
                inputs.append(match)
            else:
                raise ValueError(f"input {pattern!r}: {match!r} is not a supported kind "
                                 f"(expected a datasets folder or one of {', '.join(FILE_SUFFIXES)})")
    return sorted(dict.fromkeys(inputs))


def _files_below(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if name.endswith(FILE_SUFFIXES) and not name.startswith("."))
    return found


def iter_web_documents(path: str, *, fields: InputFields = InputFields(), skips: SkipLog,
                       max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
                       ignored: Counter | None = None) -> Iterator[WebDocument]:
    """Documents of one input (a file or a ``datasets`` folder), dispatching on its kind.

    ``skips`` counts bad input (with locations); ``ignored`` (if given) counts WARC records that are
    not documents by design (``warcinfo``, ``request``, ``metadata`` ...), which are not errors."""
    if is_datasets_folder(path):
        yield from _iter_datasets_folder(path, fields, skips, max_document_bytes)
        return
    if not path.endswith(FILE_SUFFIXES):
        raise ValueError(f"input {path!r} is not a supported kind "
                         f"(expected a datasets folder or one of {', '.join(FILE_SUFFIXES)})")
    try:
        size = os.path.getsize(path)
    except OSError as err:
        skips.add("unreadable_file", f"{path} ({err.strerror or err})")
        return
    if size == 0:
        skips.add("empty_file", path)
        return
    if path.endswith(WARC_SUFFIXES + WET_SUFFIXES):
        yield from _iter_warc(path, skips, max_document_bytes, Counter() if ignored is None else ignored)
    else:
        for record, where in iter_records(path, fields.text, skips):
            doc = document_from_record(record, where, fields, skips, max_document_bytes)
            if doc is not None:
                yield doc


def document_from_record(record: dict, where: str, fields: InputFields, skips: SkipLog,
                         max_document_bytes: int) -> WebDocument | None:
    """A record whose ``fields.text`` is a string -> a document (other fields -> ``meta``), or None
    (counted) when the text is over ``max_document_bytes``."""
    text = record[fields.text]
    # A character is 1-4 UTF-8 bytes: only texts in between the two bounds need encoding to measure.
    if len(text) > max_document_bytes or (
            4 * len(text) > max_document_bytes and len(text.encode("utf-8")) > max_document_bytes):
        skips.add("document_too_large", where)
        return None
    meta = {key: value for key, value in record.items() if key not in (fields.text, fields.id, fields.url)}
    raw_id = record.get(fields.id)
    url = record.get(fields.url)
    return WebDocument(
        id=str(raw_id) if raw_id not in (None, "") else content_id(text),
        text=text,
        url=str(url) if url not in (None, "") else None,
        source=where,
        meta=meta,
    )


def _iter_datasets_folder(path: str, fields: InputFields, skips: SkipLog,
                          max_document_bytes: int) -> Iterator[WebDocument]:
    for split, rows in _datasets_splits(path, skips):
        label = f"{path}[{split}]" if split else path
        columns = rows.column_names
        if columns is not None and fields.text not in columns:
            skips.add(f"missing_field_{fields.text}", f"{label} (columns: {', '.join(columns)})")
            continue
        row_no = 0
        try:
            for row_no, record in enumerate(rows, start=1):
                where = f"{label}:row {row_no}"
                if fields.text not in record:
                    skips.add(f"missing_field_{fields.text}", where)
                    continue
                if not isinstance(record[fields.text], str):
                    skips.add(f"non_string_{fields.text}", where)
                    continue
                doc = document_from_record(record, where, fields, skips, max_document_bytes)
                if doc is not None:
                    yield doc
        except Exception as err:  # a streamed data file that fails to parse ends that split only
            skips.add("truncated_or_corrupt_file", f"{label}:row {row_no + 1} ({err.__class__.__name__})")


def _datasets_splits(path: str, skips: SkipLog):
    """(split name, rows) of a datasets folder; an unreadable folder is counted, not raised."""
    import datasets

    try:
        if any(os.path.isfile(os.path.join(path, name)) for name in _SAVED_DATASET_MARKERS):
            loaded = datasets.load_from_disk(path)
        else:
            # streaming reads the local data files in place: no Arrow cache is written under ~/.cache.
            loaded = datasets.load_dataset(path, streaming=True)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetGenerationError ...)
        skips.add("unreadable_file", f"{path} ({err.__class__.__name__}: {err})")
        return
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        yield from sorted(loaded.items())
    else:
        yield "", loaded


# --- WARC and WET -------------------------------------------------------------------------------------

_WARC_MAGIC = b"WARC/1."
_GZIP_MAGIC = b"\x1f\x8b\x08"
_CHUNK = 1 << 20
_MAX_WARC_HEADER = 1 << 20
_RECORD_TRAILER = b"\r\n\r\n"

# (kind, payload) of one WARC record: ("doc", WebDocument), ("skip", reason), ("ignore", counter name),
# or ("short", None) for a record that ended before its Content-Length.
_Outcome = tuple[str, object]


def _iter_warc(path: str, skips: SkipLog, max_document_bytes: int, ignored: Counter) -> Iterator[WebDocument]:
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
    """The first record start at or after ``start`` (see ``_iter_warc``), or None."""
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
