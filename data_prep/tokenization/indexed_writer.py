"""``gptforge tokenize``: JSONL/Parquet documents -> a Megatron indexed dataset (``PREFIX.bin``/``.idx``).

Documents are tokenized in worker processes (ordered, so the output is the same for any worker count),
each followed by the end-of-document token (GPT-3 Appendix B: documents packed into sequences,
separated by an end-of-text token). The ``.bin``/``.idx`` pair (megatron-core's ``MMIDIDX`` format, written
by ``IndexedWriter`` with numpy alone, so tokenizing needs no torch) goes to temporary names, is fsynced
and renamed; ``PREFIX.json`` (the tokenizer fingerprint and the counts) is renamed into place last and
marks the dataset complete.
"""

from __future__ import annotations

import array
import json
import multiprocessing as mp
import os
import struct
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ...common.atomic import atomic_write_json, fsync_path
from ...common.errors import UserError
from ..readers.documents import SkipLog, check_input_files, iter_texts
from .tokenizer import Tokenizer

# megatron-core's MMIDIDX index, as its IndexedDataset reads it: the
# magic, version 1, one byte of dtype code, then sequence count and document count (uint64), each
# sequence's length (int32), its byte offset in .bin (int64) and the document boundaries (int64).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """megatron-core's ``DType.optimal_dtype``: uint16 for a vocabulary of fewer than 65500 tokens, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Writes a megatron-core indexed dataset of single-sequence documents, byte for byte what
    ``IndexedDatasetBuilder(bin_path, dtype).add_document(ids, [len(ids)])`` + ``finalize(idx_path)``
    write (``tests/test_indexed_writer.py`` compares the two)."""

    def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        self._code = _DTYPE_CODES[self.dtype]
        self._data = open(bin_path, "wb")
        self._lengths = array.array("q")

    def add_document(self, ids: np.ndarray) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        self._data.write(tokens.tobytes(order="C"))
        self._lengths.append(tokens.size)

    def finalize(self, idx_path: str) -> None:
        self._data.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {int(lengths.max())} tokens does not fit the index's int32 lengths")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(lengths.size + 1, dtype=np.int64)  # one sequence per document
        with open(idx_path, "wb") as handle:
            handle.write(_INDEX_HEADER)
            handle.write(struct.pack("<Q", _INDEX_VERSION))
            handle.write(struct.pack("<B", self._code))
            handle.write(struct.pack("<Q", lengths.size))
            handle.write(struct.pack("<Q", documents.size))
            handle.write(lengths.astype(np.int32).tobytes(order="C"))
            handle.write(pointers.tobytes(order="C"))
            handle.write(documents.tobytes(order="C"))

    def close(self) -> None:
        self._data.close()


_WORKER_TOKENIZER: Tokenizer | None = None  # one per worker process, set by the pool initializer


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return [np.asarray(ids, dtype=np.int32) for ids in _WORKER_TOKENIZER.encode_batch(texts)]


@dataclass(kw_only=True)
class TokenizeResult:
    prefix: str
    documents: int
    tokens: int
    skips: SkipLog
    seconds: float


def metadata_path(prefix: str) -> str:
    return prefix + ".json"


def read_metadata(prefix: str) -> dict:
    """The sidecar of a dataset written by ``gptforge tokenize`` (a clear error if it is not there)."""
    path = metadata_path(prefix)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"dataset {prefix!r}: {prefix + ext} does not exist; "
                                    f"build it with 'gptforge tokenize'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {prefix!r}: {path} is missing, so it was not completed by "
                                f"'gptforge tokenize'; run it again")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _chunks(inputs: list[str], text_field: str, skips: SkipLog, chunk_docs: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in inputs:
        for text in iter_texts(path, text_field, skips):
            if not text:
                skips.add("empty_text", path)
                continue
            chunk.append(text)
            if len(chunk) == chunk_docs:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def tokenize_to_indexed(
    inputs: list[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    text_field: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    chunk_docs: int = 64,
    progress: bool = True,
) -> TokenizeResult:
    errors = check_input_files(inputs, "tokenize: --input")
    if workers < 1:
        errors.append(f"tokenize: --workers must be >= 1, got {workers}")
    if errors:
        raise UserError("\n".join(errors))
    tokenizer = Tokenizer(tokenizer_path)
    dtype = optimal_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    tmp_bin, tmp_idx = output_prefix + ".bin.tmp", output_prefix + ".idx.tmp"
    skips = SkipLog()
    documents = tokens = 0
    start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"tokenize {os.path.basename(output_prefix)}", unit="doc", mininterval=1.0)
    pool = None
    builder = None
    try:
        builder = IndexedWriter(tmp_bin, dtype)
        chunks = _chunks(inputs, text_field, skips, chunk_docs)
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,))
            encoded = pool.imap(_encode_chunk, chunks, chunksize=1)  # ordered: output independent of workers
        else:
            _init_worker(tokenizer_path)
            encoded = map(_encode_chunk, chunks)
        for chunk in encoded:
            for ids in chunk:
                if append_eod:
                    ids = np.append(ids, tokenizer.eod)
                builder.add_document(ids)
                documents += 1
                tokens += int(ids.size)
            if bar is not None:
                bar.update(len(chunk))
        if documents == 0:
            raise UserError(f"tokenize: no documents with a non-empty {text_field!r} field in "
                             f"{', '.join(inputs)} ({skips.summary()})")
        builder.finalize(tmp_idx)
        fsync_path(tmp_bin)
        fsync_path(tmp_idx)
        # Drop the old completion marker first: a kill between the renames leaves an incomplete set.
        if os.path.exists(metadata_path(output_prefix)):
            os.remove(metadata_path(output_prefix))
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
        atomic_write_json(
            metadata_path(output_prefix),
            {
                "format": "megatron-indexed",
                "dtype": np.dtype(dtype).name,
                "documents": documents,
                "tokens": tokens,
                "append_eod": append_eod,
                "text_field": text_field,
                "inputs": [os.path.abspath(p) for p in inputs],
                "tokenizer": tokenizer.describe(),
                "skipped": dict(skips.counts),
                "skipped_examples": skips.examples,
            },
        )
    finally:
        if builder is not None:
            builder.close()
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return TokenizeResult(prefix=output_prefix, documents=documents, tokens=tokens, skips=skips,
                          seconds=time.time() - start)
