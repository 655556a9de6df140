"""store/reader.py: committed part files only, a damaged output named, embedding columns of every shape."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hades_gpu.store.reader import (DamagedOutputError, committed_part_files, embeddings_to_numpy, read_isne_embeddings,
                                    read_table)

from tests.store.test_writer import DIM, varied_doc


def _output(tmp_path):
    from writer_feed import ChunkFeed, EmbeddedBatch
    from hades_gpu.store.writer import DatasetWriter

    for shard in ("s0", "s1"):
        w = ChunkFeed(DatasetWriter(tmp_path, shard, DIM, rows_per_part=100))
        d = varied_doc(f"{shard}.py", 2, shard)
        w.begin_document(d)
        w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.ones((2, DIM), np.float32)))
        w.close()
    return tmp_path


def test_committed_part_files_of_every_shard_and_a_damaged_output_named(tmp_path):
    out = _output(tmp_path)
    files = committed_part_files(out, "chunks")
    assert [f.name for f in files] == ["part-s0-00001.parquet", "part-s1-00001.parquet"]
    assert read_table(out, "chunks", ["chunk_id"]).num_rows == 4
    files[1].unlink()  # a committed part removed by hand
    with pytest.raises(DamagedOutputError, match=r"1 committed part file\(s\) are missing, e.g. .*part-s1-00001"):
        read_table(out, "chunks")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_table(empty, "chunks", ["a", "b"], missing_ok=True).schema.names == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no committed chunks part files"):
        read_table(empty, "chunks")


def test_isne_vectors_of_every_file_and_one_dimension(tmp_path):
    import pyarrow.parquet as pq

    ids, vecs = read_isne_embeddings(tmp_path)
    assert ids == [] and vecs.shape == (0, 0)
    (tmp_path / "isne").mkdir()
    for shard, d in (("s0", 3), ("s1", 3)):
        pq.write_table(pa.table({"chunk_id": [f"{shard}-a", f"{shard}-b"],
                                 "isne_embedding": pa.array([[1.0] * d, [2.0] * d], pa.list_(pa.float32()))}),
                       tmp_path / "isne" / f"embeddings-{shard}.parquet")
    ids, vecs = read_isne_embeddings(tmp_path)
    assert ids == ["s0-a", "s0-b", "s1-a", "s1-b"] and vecs.shape == (4, 3) and vecs[1, 0] == 2.0
    pq.write_table(pa.table({"chunk_id": ["x"], "isne_embedding": pa.array([[1.0] * 5], pa.list_(pa.float32()))}),
                   tmp_path / "isne" / "embeddings-s2.parquet")
    with pytest.raises(ValueError, match=r"share one dimension \(got \[3, 5\]\)"):
        read_isne_embeddings(tmp_path)


def test_embeddings_from_variable_length_lists_with_nulls_and_empty_rows() -> None:
    rows = [[1.0, 2.0, 3.0], None, [4.0, 5.0, 6.0], [], [7.5, 8.5, 9.5]]
    arr = pa.array(rows, pa.list_(pa.float64()))
    out = embeddings_to_numpy(arr)
    want = np.array([[1, 2, 3], [0, 0, 0], [4, 5, 6], [0, 0, 0], [7.5, 8.5, 9.5]], np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
    # a slice of a chunked column (offsets into the values buffer)
    chunked = pa.chunked_array([arr.slice(2), pa.array([[1.0, 1.0, 1.0]], pa.list_(pa.float64()))])
    np.testing.assert_array_equal(embeddings_to_numpy(chunked), np.vstack([want[2:], np.ones((1, 3), np.float32)]))
    # nothing stored: (n, dim) zeros when the width is known, (n, 0) when not
    empty = pa.array([None, []], pa.list_(pa.float32()))
    assert embeddings_to_numpy(empty, dim=4).shape == (2, 4) and not embeddings_to_numpy(empty, dim=4).any()
    assert embeddings_to_numpy(empty).shape == (2, 0)
    with pytest.raises(ValueError, match=r"same length \(got \[2 3\]\)"):
        embeddings_to_numpy(pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32())))


def test_embeddings_from_fixed_size_lists_sliced_and_with_nulls() -> None:
    values = np.arange(24, dtype=np.float64).reshape(6, 4)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 4)
    out = embeddings_to_numpy(arr.slice(2, 3))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values[2:5].astype(np.float32))
    with_nulls = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2))
    np.testing.assert_array_equal(embeddings_to_numpy(with_nulls), [[1, 2], [0, 0], [3, 4]])
    src = np.ones(4, np.float32)
    zero_copy = pa.FixedSizeListArray.from_arrays(pa.array(src), 2)
    got = embeddings_to_numpy(pa.chunked_array([zero_copy, zero_copy]))
    np.testing.assert_array_equal(got, np.ones((4, 2), np.float32))
