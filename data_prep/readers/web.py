"""Readers for every input kind of the corpus pipeline, each yielding ``WebDocument``s.

Kinds, by suffix: WARC and WET (``.warc``, ``.warc.gz``, ``.wet``, ``.wet.gz``; read with FastWARC), JSONL
(``.jsonl``/``.json``, plain, ``.gz`` or ``.zst``), Parquet, and a local Hugging Face ``datasets`` folder
(a saved dataset, read with ``load_from_disk``, or a folder with a dataset card ``README.md`` whose data
files ``load_dataset`` reads; never anything remote).

Every bad input is counted in the ``SkipLog`` with its file and line, row or byte offset and never stops
the read. WARC records FastWARC cannot parse are recovered from as ``warc.iter_warc`` describes.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from .documents import JSONL_SUFFIXES, PARQUET_SUFFIXES, SkipLog, iter_records
from .warc import WARC_SUFFIXES, WET_SUFFIXES, iter_warc
from .web_document import WebDocument, content_id

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
        yield from iter_warc(path, skips, max_document_bytes, Counter() if ignored is None else ignored)
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
