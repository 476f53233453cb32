"""Streamed, atomic output shards: JSONL compressed with zstd, or Parquet.

Records go to a hidden temporary file beside the target; ``close()`` flushes, fsyncs and renames it into
place, so a killed writer never leaves a half-written shard under the final name (``abort()`` or an
exception inside ``with`` removes the temporary file). Memory holds one Parquet row group at most.

Parquet shards have the columns ``id``, ``text``, ``url`` and ``metadata`` (the record's other fields
as a JSON object string): records of one corpus rarely share a schema, and ``gptforge tokenize`` needs
only ``text``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator

from ...common.atomic import fsync_path

FORMATS = ("jsonl.zst", "parquet")
PARQUET_COLUMNS = ("id", "text", "url")


def shard_name(index: int, fmt: str) -> str:
    return f"{index:05d}.{fmt}"


class ShardWriter:
    """``with ShardWriter(path, fmt) as w: w.write(record)``: the shard appears complete or not at all."""

    def __init__(self, path: str, fmt: str, *, zstd_level: int = 3, row_group: int = 2048) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"output.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.path, self.fmt, self.count, self.bytes = path, fmt, 0, 0
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # A writer of this shard that was killed left its temporary file: one task owns a shard, so
        # whatever carries this shard's temporary prefix is stale.
        prefix = f".{os.path.basename(path)}."
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))
        fd, self._tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        self._raw = os.fdopen(fd, "wb")
        self._rows: list[dict] = []
        self._row_group = row_group
        if fmt == "jsonl.zst":
            import zstandard

            self._zst = zstandard.ZstdCompressor(level=zstd_level).stream_writer(self._raw, closefd=False)
        else:
            self._parquet = None

    def write(self, record: dict) -> None:
        self.count += 1
        self.bytes += len(record.get("text", "").encode("utf-8"))
        if self.fmt == "jsonl.zst":
            self._zst.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            return
        self._rows.append(record)
        if len(self._rows) >= self._row_group:
            self._flush_rows()

    def _flush_rows(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [r.get(name) for r in self._rows] for name in PARQUET_COLUMNS}
        columns["metadata"] = [json.dumps({k: v for k, v in r.items() if k not in PARQUET_COLUMNS},
                                          ensure_ascii=False) for r in self._rows]
        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()),
                            ("metadata", pa.string())])
        table = pa.Table.from_pydict({k: [None if v is None else str(v) for v in vals]
                                      for k, vals in columns.items()}, schema=schema)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._raw, schema, compression="zstd")
        self._parquet.write_table(table)
        self._rows = []

    def close(self) -> None:
        """Finish the shard and rename it into place (durably)."""
        if self.fmt == "jsonl.zst":
            self._zst.flush(__import__("zstandard").FLUSH_FRAME)
            self._zst.close()
        else:
            if self._rows or self._parquet is None:
                self._flush_rows()
            self._parquet.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: str) -> Iterator[dict]:
    """The records of a shard this module wrote (Parquet ``metadata`` folded back into each record)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                meta = json.loads(row.pop("metadata") or "{}")
                yield {k: v for k, v in row.items() if v is not None or k != "url"} | meta
        return
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        pending = b""
        while chunk := reader.read(1 << 20):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line:
                    yield json.loads(line)
        if pending.strip():
            yield json.loads(pending)
