"""Reading records from JSONL (plain, .gz or .zst) and Parquet files, with counted, located skips.

A bad record (invalid JSON, invalid UTF-8, not an object, no text field, a text that is not a string)
is skipped and counted with its file and line; it never stops the read, and every valid record around
it comes through. A file that cannot be opened or a truncated gzip/zstd stream is counted too.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(kw_only=True)
class SkipLog:
    """What was skipped and where: reason -> count, plus the first few locations of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.max_examples:
            seen.append(where)

    def merge(self, other: "SkipLog") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            seen = self.examples.setdefault(reason, [])
            seen.extend(other.examples.get(reason, [])[: self.max_examples - len(seen)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = [f"{reason}: {count} (e.g. {', '.join(self.examples.get(reason, []))})"
                 for reason, count in sorted(self.counts.items())]
        return "skipped " + "; ".join(parts)


def check_input_files(paths: list[str], flag: str = "input") -> list[str]:
    """Errors for inputs that are missing or of a kind we cannot read (each naming the file)."""
    errors = []
    for path in paths:
        if not os.path.isfile(path):
            errors.append(f"{flag}: no such file {path!r}")
        elif not path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            errors.append(
                f"{flag}: {path!r} is not a supported file (expected one of "
                f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
            )
    return errors


def iter_texts(path: str, text_field: str, skips: SkipLog) -> Iterator[str]:
    """Yield the ``text_field`` of every valid record of one JSONL or Parquet file."""
    for record, _ in iter_records(path, text_field, skips):
        yield record[text_field]


def iter_records(path: str, text_field: str | None, skips: SkipLog) -> Iterator[tuple[dict, str]]:
    """Yield (record, location) for every valid record of one JSONL(.gz/.zst) or Parquet file: a dict
    with a string ``text_field`` (all other fields unchanged; ``None``: any JSON object); location is
    ``file:line`` / ``file:row N``."""
    if path.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, text_field, skips)
    else:
        yield from _iter_jsonl(path, text_field, skips)


class TruncatedStream(EOFError):
    """A compressed stream that ended inside a frame."""


def _zstd_lines(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file. zstandard's stream reader returns a clean EOF when a file
    ends mid-frame, which would lose the tail silently: decode frame by frame and raise instead."""
    import zstandard

    with open(path, "rb") as handle:
        decoder, pending, fed = zstandard.ZstdDecompressor().decompressobj(), b"", False
        while True:
            data = handle.read(chunk)
            if not data:
                break
            while data:
                out = decoder.decompress(data)
                fed = True
                data = b""
                if decoder.eof:  # a frame ended; what follows is the next frame
                    data, decoder, fed = decoder.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
                pending += out
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line + b"\n"
        if fed:
            raise TruncatedStream(f"{path} ends inside a zstd frame")
        if pending:
            yield pending


def _open_lines(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return contextlib.closing(_zstd_lines(path))
    return open(path, "rb")


def _iter_jsonl(path: str, text_field: str | None, skips: SkipLog) -> Iterator[tuple[dict, str]]:
    import zstandard

    line_no = 0
    try:
        with _open_lines(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skips.add("invalid_utf8", where)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skips.add("invalid_json", where)
                    continue
                if not isinstance(record, dict):
                    skips.add("not_an_object" if text_field is None else f"missing_field_{text_field}", where)
                    continue
                if text_field is None:
                    yield record, where
                    continue
                if text_field not in record:
                    skips.add(f"missing_field_{text_field}", where)
                    continue
                if not isinstance(record[text_field], str):
                    skips.add(f"non_string_{text_field}", where)
                    continue
                yield record, where
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as err:
        skips.add("truncated_or_corrupt_file", f"{path}:{line_no + 1} ({err.__class__.__name__})")
    except OSError as err:
        skips.add("unreadable_file", f"{path} ({err.strerror or err})")


def _iter_parquet(path: str, text_field: str | None, skips: SkipLog) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        skips.add("unreadable_file", f"{path} ({err})")
        return
    if text_field is not None and text_field not in parquet.schema_arrow.names:
        skips.add(f"missing_field_{text_field}", f"{path} (columns: {', '.join(parquet.schema_arrow.names)})")
        return
    row = 0
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            row += 1
            if text_field is not None and not isinstance(record.get(text_field), str):
                skips.add(f"non_string_{text_field}", f"{path}:row {row}")
                continue
            yield record, f"{path}:row {row}"
