"""Our numpy MMIDIDX writer against megatron-core's ``IndexedDatasetBuilder``: the same bytes, read back
by megatron-core's ``IndexedDataset``."""

from __future__ import annotations

import numpy as np
import pytest

from gptforge.data_prep.tokenization.indexed_writer import IndexedWriter, optimal_dtype
from gptforge.training.data import import_megatron_datasets

pytestmark = pytest.mark.unit


def documents(vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # Lengths 1..300 and one long document, ids up to the top of the vocabulary.
    docs = [rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(np.int32) for n in rng.integers(1, 300, 40)]
    docs.append(np.full(5000, vocab_size - 1, dtype=np.int32))
    return docs


@pytest.mark.parametrize("vocab_size", [512, 65499, 65500, 100_000])
def test_bytes_equal_megatron_builder_and_megatron_reads_them(tmp_path, vocab_size):
    _, _, indexed_dataset = import_megatron_datasets()
    dtype = optimal_dtype(vocab_size)
    assert dtype is indexed_dataset.DType.optimal_dtype(vocab_size)
    docs = documents(vocab_size)

    ours = IndexedWriter(str(tmp_path / "ours.bin"), dtype)
    theirs = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for ids in docs:
        ours.add_document(ids)
        theirs.add_document(ids, [ids.size])
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes(), ext

    ds = indexed_dataset.IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and ds.index.dtype == dtype
    assert list(ds.document_indices) == list(range(len(docs) + 1))
    for i in (0, 17, len(docs) - 1):
        assert np.array_equal(ds[i], docs[i].astype(dtype))
