import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from hades_gpu.records import Chunk, ChunkedDocument, DocumentRef, stable_id
from writer_feed import ChunkFeed, EmbeddedBatch
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.reader import read_chunks, read_documents
from hades_gpu.store.writer import DatasetWriter

DIM = 4


def make_doc(rel, n, content="v1"):
    ref = DocumentRef(path=f"/corpus/{rel}", rel_path=rel, size=10, modality="prose", language="text")
    h = stable_id(content)
    chunks = [Chunk(doc_id=ref.doc_id, chunk_id=stable_id(ref.doc_id, h, str(i)), path=ref.path, modality="prose",
                    ordinal=i, char_start=i, char_end=i + 1, text=f"{content}-{i}",
                    token_ids=np.array([5, 6], dtype=np.int32)) for i in range(n)]
    return ChunkedDocument(ref=ref, content_hash=h, chunks=chunks, references=["x.md"])


def with_stat(doc, size, mtime_ns):
    """The document as discovery would have found it: with its file's size and mtime."""
    return dataclasses.replace(doc, ref=dataclasses.replace(doc.ref, size=size, mtime_ns=mtime_ns))


def embed_all(writer, docs):
    chunks = [c for d in docs for c in d.chunks]
    rng = np.random.default_rng(0)
    for i in range(0, len(chunks), 3):  # batches that cut across documents, in shuffled order
        part = chunks[i:i + 3][::-1]
        writer.add(EmbeddedBatch(chunks=part, embeddings=rng.random((len(part), DIM), dtype=np.float32)))


def test_whole_documents_per_part_and_manifest(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=4))
    docs = [make_doc(f"d{i}.txt", n) for i, n in enumerate([3, 2, 5, 1])]
    for d in docs:
        w.begin_document(with_stat(d, 10, 7))
    embed_all(w, docs)
    w.close()
    table = read_chunks(tmp_path).to_pandas()
    assert len(table) == 11 and table.chunk_id.is_unique
    for part in Manifest.load(tmp_path, "s0").parts():
        part_table = pq.read_table(tmp_path / "chunks" / f"{part}.parquet").to_pandas()
        for doc_id, rows in part_table.groupby("doc_id"):
            assert sorted(rows.ordinal) == list(range(len(rows)))  # never split across parts
    m = Manifest.load(tmp_path, "s0")
    assert [rel for rel, _ in m.documents()] == [f"d{i}.txt" for i in range(4)]
    assert read_documents(tmp_path).column("references").to_pylist()[0] == ["x.md"]
    assert pq.read_schema(tmp_path / "chunks" / f"{m.parts()[0]}.parquet").field("embedding").type.list_size == DIM


def test_orphan_parts_are_removed_on_open(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    d = make_doc("a.txt", 2)
    w.begin_document(d)
    embed_all(w, [d])
    w.close()
    orphan = tmp_path / "chunks" / "part-s0-00099.parquet"
    orphan.write_bytes(b"partial")
    (tmp_path / "chunks" / ".part-s0-00100.parquet.tmp-1").write_bytes(b"tmp")
    w2 = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    assert not orphan.exists() and len(w2.removed_orphans) == 2
    assert len(read_chunks(tmp_path)) == 2


def test_changed_document_replaces_old_rows(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    old, other = make_doc("a.txt", 3, "v1"), make_doc("b.txt", 2)
    for d in (old, other):
        w.begin_document(d)
    embed_all(w, [old, other])
    w.close()
    w = ChunkFeed(second := DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    new = make_doc("a.txt", 2, "v2")
    w.begin_document(new)
    embed_all(w, [new])
    w.close()
    assert second.parts_written == 2  # the new part and the old one rewritten (metrics.json said 1)
    table = read_chunks(tmp_path).to_pandas()
    assert sorted(table.text) == ["v1-0", "v1-1", "v2-0", "v2-1"]  # b's two rows + a's new two
    parts = sorted((tmp_path / "chunks").glob("*.parquet"))
    assert len(parts) == 2  # the new part and the rewrite of the old one without a.txt
    for part in parts:
        assert_chunk_encoding(part)
    assert len(read_documents(tmp_path)) == 2


def test_embedding_shape_checked(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    d = make_doc("a.txt", 1)
    w.begin_document(d)
    with pytest.raises(ValueError, match=r"embeddings must have 4 dimensions \(got 3\)"):
        w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.zeros((1, 3), np.float32)))


def varied_doc(rel: str, n: int, content: str, modality: str = "code", language: str = "python"):
    """A document whose every field differs per chunk, so a swapped or dropped column shows."""
    ref = DocumentRef(path=f"/corpus/{rel}", rel_path=rel, size=100 + n, modality=modality, language=language)
    h = stable_id(content)
    chunks = [Chunk(doc_id=ref.doc_id, chunk_id=stable_id(ref.doc_id, h, str(i)), path=ref.path, modality=modality,
                    ordinal=i, char_start=10 * i + 3, char_end=10 * i + 11 + i, text=f"{content} chunk {i} ✓",
                    token_ids=np.arange(5 + i, dtype=np.int32)) for i in range(n)]
    return ChunkedDocument(ref=ref, content_hash=h, chunks=chunks, references=[f"ref{j}" for j in range(n % 3)])


def test_every_column_and_manifest_field_round_trips(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=5))
    docs = [varied_doc("pkg/a.py", 3, "alpha"), varied_doc("docs/b.md", 4, "beta", "prose", "markdown"),
            varied_doc("c.py", 1, "gamma"), varied_doc("d.txt", 2, "delta", "prose", "text")]
    vectors = {}
    rng = np.random.default_rng(1)
    for k, d in enumerate(docs):
        w.begin_document(with_stat(d, 1000 + k, 77_000 + k))
    for d in docs:  # embed document by document, each chunk its own known vector
        v = rng.random((len(d.chunks), DIM), dtype=np.float32)
        vectors.update({c.chunk_id: v[i] for i, c in enumerate(d.chunks)})
        w.add(EmbeddedBatch(chunks=d.chunks, embeddings=v))
    w.close()
    assert (w.parts_written, w.rows_written, w.documents_committed) == (2, 10, 4)  # 3+4 rows, then 1+2

    table = read_chunks(tmp_path).to_pandas().set_index("chunk_id")
    assert len(table) == 10
    for d in docs:
        for c in d.chunks:
            row = table.loc[c.chunk_id]
            assert (row.doc_id, row.path, row.modality, row.ordinal, row.char_start, row.char_end, row.n_tokens,
                    row.text) == (c.doc_id, c.path, c.modality, c.ordinal, c.char_start, c.char_end, c.n_tokens, c.text)
            np.testing.assert_array_equal(np.asarray(row.embedding, np.float32), vectors[c.chunk_id])
    dt = read_documents(tmp_path).to_pandas().set_index("rel_path")
    assert list(read_documents(tmp_path).schema.names) == ["doc_id", "path", "rel_path", "modality", "language",
                                                          "content_hash", "n_chunks", "references",
                                                          "rel_path_bytes", "path_bytes", "encoding"]
    for d in docs:
        row = dt.loc[d.ref.rel_path]
        assert (row.doc_id, row.path, row.modality, row.language, row.content_hash, row.n_chunks, list(row.references)) \
            == (d.ref.doc_id, d.ref.path, d.ref.modality, d.ref.language, d.content_hash, len(d.chunks), d.references)

    m = Manifest.load(tmp_path, "s0")
    assert m.parts() == ["part-s0-00001", "part-s0-00002"] and m.next_part_number() == 3
    for k, d in enumerate(docs):
        e = m.lookup(d.ref.rel_path)
        assert (e.doc_id, e.content_hash, e.n_chunks, e.size, e.mtime_ns) == \
            (d.ref.doc_id, d.content_hash, len(d.chunks), 1000 + k, 77_000 + k)
        assert e.part == ("part-s0-00001" if k < 2 else "part-s0-00002")
        assert m.is_unchanged(d.ref.rel_path, 1000 + k, 77_000 + k)
        assert not m.is_unchanged(d.ref.rel_path, 1001 + k, 77_000 + k)
        assert not m.is_unchanged(d.ref.rel_path, 1000 + k, 77_001 + k)
    assert not m.is_unchanged("unknown.py", 0, 0)


def test_note_unchanged_is_saved_at_close_for_known_documents_only(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    d = varied_doc("a.py", 2, "x")
    w.begin_document(with_stat(d, 5, 6))
    w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.ones((2, DIM), np.float32)))
    w.close()
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    w.note_unchanged("a.py", 5, 99)
    w.note_unchanged("never-seen.py", 1, 2)
    assert Manifest.load(tmp_path, "s0").lookup("a.py").mtime_ns == 6  # not before close
    w.close()
    m = Manifest.load(tmp_path, "s0")
    assert (m.lookup("a.py").size, m.lookup("a.py").mtime_ns) == (5, 99)
    assert m.lookup("never-seen.py") is None and m.parts() == ["part-s0-00001"]


def test_shards_have_their_own_manifest_and_parts_and_readers_see_only_committed(tmp_path):
    for shard, rel in (("s0", "a.py"), ("s3", "b.py")):
        w = ChunkFeed(DatasetWriter(tmp_path, shard, DIM, rows_per_part=100))
        d = varied_doc(rel, 2, shard)
        w.begin_document(d)
        w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.ones((2, DIM), np.float32)))
        w.close()
    assert (tmp_path / "manifest-s0.sqlite").is_file() and (tmp_path / "manifest-s3.sqlite").is_file()
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["part-s0-00001.parquet", "part-s3-00001.parquet"]
    # a stray part no manifest names (a crashed run's) is not read, and nothing else is disturbed
    (tmp_path / "chunks" / "part-s9-00001.parquet").write_bytes((tmp_path / "chunks" / "part-s0-00001.parquet").read_bytes())
    assert sorted(read_chunks(tmp_path, ["text"]).column("text").to_pylist()) == \
        ["s0 chunk 0 ✓", "s0 chunk 1 ✓", "s3 chunk 0 ✓", "s3 chunk 1 ✓"]
    assert read_chunks(tmp_path, ["chunk_id"]).schema.names == ["chunk_id"]
    from hades_gpu.store.reader import committed_parts, is_ingest_output

    assert committed_parts(tmp_path) == ["part-s0-00001", "part-s3-00001"]
    assert is_ingest_output(tmp_path) and not is_ingest_output(tmp_path / "chunks")
    with pytest.raises(FileNotFoundError, match="no committed chunks part files"):
        read_chunks(tmp_path / "chunks")


def test_document_without_chunks_is_committed_at_once(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100))
    d = varied_doc("empty.py", 0, "none")
    w.begin_document(with_stat(d, 3, 4))
    assert w.pending_documents == 0
    w.close()
    m = Manifest.load(tmp_path, "s0")
    assert m.lookup("empty.py").n_chunks == 0 and w.documents_committed == 1 and w.rows_written == 0


def test_incomplete_document_is_not_committed(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=1))
    d = varied_doc("a.py", 3, "x")
    w.begin_document(d)
    w.add(EmbeddedBatch(chunks=d.chunks[:2], embeddings=np.ones((2, DIM), np.float32)))
    assert w.pending_documents == 1
    w.close()
    assert Manifest.load(tmp_path, "s0").lookup("a.py") is None
    with pytest.raises(KeyError, match="unregistered document"):
        w.add(EmbeddedBatch(chunks=varied_doc("b.py", 1, "y").chunks, embeddings=np.ones((1, DIM), np.float32)))


def test_part_committed_exactly_when_ready_rows_reach_the_part_size(tmp_path, caplog):
    commits = []
    w = ChunkFeed(DatasetWriter(tmp_path / "new" / "deeper", "s0", DIM, rows_per_part=4))  # folders made as needed
    w.on_commit = lambda docs, rows: commits.append((docs, rows))
    a, b, c = varied_doc("a.py", 3, "a"), varied_doc("b.py", 1, "b"), varied_doc("c.py", 2, "c")
    for d in (a, b, c):
        w.begin_document(d)
    w.add(EmbeddedBatch(chunks=a.chunks, embeddings=np.ones((3, DIM), np.float32)))
    assert w.parts_written == 0  # 3 ready rows < 4
    w.add(EmbeddedBatch(chunks=b.chunks, embeddings=np.ones((1, DIM), np.float32)))
    assert w.parts_written == 1 and commits == [(2, 4)]  # exactly 4: committed now, not at close
    w.add(EmbeddedBatch(chunks=c.chunks[:1], embeddings=np.ones((1, DIM), np.float32)))
    caplog.set_level("WARNING", logger="hades_gpu.store.writer")
    w.close()
    assert commits == [(2, 4)] and w.pending_documents == 1
    assert "1 document(s) were not fully embedded" in caplog.text
    part = tmp_path / "new" / "deeper" / "chunks" / "part-s0-00001.parquet"
    assert_chunk_encoding(part)


def assert_chunk_encoding(part):
    """Text columns zstd with statistics; the embedding column's values uncompressed, without them."""
    meta = pq.ParquetFile(part).metadata
    assert meta.num_rows
    for g in range(meta.num_row_groups):
        columns = {meta.row_group(g).column(i).path_in_schema: meta.row_group(g).column(i)
                   for i in range(meta.row_group(g).num_columns)}
        assert columns["text"].compression == "ZSTD" and columns["text"].is_stats_set
        assert columns["doc_id"].compression == "ZSTD"
        vectors = [c for path, c in columns.items() if path.startswith("embedding")]
        assert len(vectors) == 1 and vectors[0].compression == "UNCOMPRESSED" and not vectors[0].is_stats_set


def test_orphans_are_named_and_minimal_manifests_read(tmp_path):
    (tmp_path / "chunks").mkdir()
    (tmp_path / "documents").mkdir()
    stray = tmp_path / "documents" / "part-s0-00007.parquet"
    stray.write_bytes(b"half a file")
    other_shard = tmp_path / "chunks" / "part-s1-00001.parquet"
    other_shard.write_bytes(b"another shard's, not ours to remove")
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1}))  # older output: no parts, no documents
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=10))
    assert w.removed_orphans == [str(stray)] and other_shard.exists()
    m = Manifest.load(tmp_path, "s0")
    assert (m.shard, m.parts(), list(m.documents())) == ("s0", [], [])
    from hades_gpu.store.reader import committed_parts

    assert committed_parts(tmp_path) == []
    d = varied_doc("a.py", 1, "z")
    w.begin_document(d)
    w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.ones((1, DIM), np.float32)))
    w.close()
    m = Manifest.load(tmp_path, "s0")
    assert m.parts() == ["part-s0-00001"] and m.lookup("a.py").part == "part-s0-00001"
    assert read_documents(tmp_path, ["rel_path"]).schema.names == ["rel_path"]


def test_ready_rows_are_encoded_into_the_open_part_before_it_is_committed(tmp_path):
    """Rows of finished documents go into the open part as row groups while the run goes on (only a
    row group's worth waits in memory); nothing is visible or committed until the part is full or
    the writer closes; the committed part reads back whole, in document order."""
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=40))
    assert w.row_group_rows == 10
    docs = [make_doc(f"d{i}.txt", 6) for i in range(5)]  # 30 rows: under a part
    for d in docs:
        w.begin_document(d)
    embed_all(w, docs)
    hidden = list((tmp_path / "chunks").glob(".part-s0-*.tmp-*"))
    assert len(hidden) == 1 and not list((tmp_path / "chunks").glob("part-*.parquet"))
    assert Manifest.load(tmp_path, "s0").parts() == [] and w.parts_written == 0
    assert sum(b.num_rows for b in w._blocks) < w.row_group_rows  # written out, not held
    more = [make_doc(f"e{i}.txt", 6) for i in range(3)]  # to 48 rows: the part fills and commits
    for d in more:
        w.begin_document(d)
    embed_all(w, more)
    assert w.parts_written == 1
    w.close()
    parts = Manifest.load(tmp_path, "s0").parts()
    first = pq.ParquetFile(tmp_path / "chunks" / f"{parts[0]}.parquet")
    assert first.metadata.num_row_groups >= 2 and first.metadata.num_rows >= 40
    table = read_chunks(tmp_path).to_pandas()
    assert len(table) == 48 and table.chunk_id.is_unique
    by_doc = table.groupby("doc_id", sort=False).ordinal.apply(list)
    assert all(v == list(range(6)) for v in by_doc)  # each document's rows together, in order
    assert not list((tmp_path / "chunks").glob(".part-*"))


def test_a_run_that_dies_with_an_open_part_commits_none_of_it(tmp_path):
    """The process dies (here: the writer is dropped unclosed and its lock released, as exit would)
    while a part is open: its rows were never committed, the next start removes the temporary, and
    those documents are simply ingested again. `discard_open_part` (a failed run) does the same at once."""
    w = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=40))
    docs = [make_doc(f"d{i}.txt", 6) for i in range(3)]
    for d in docs:
        w.begin_document(d)
    embed_all(w, docs)
    assert list((tmp_path / "chunks").glob(".part-s0-*.tmp-*"))
    w.output_lock.release()
    w.manifest.close()
    w2 = ChunkFeed(DatasetWriter(tmp_path, "s0", DIM, rows_per_part=40))
    assert len(w2.removed_orphans) == 1 and not list((tmp_path / "chunks").glob(".part-*"))
    assert Manifest.load(tmp_path, "s0").parts() == []
    for d in docs:
        w2.begin_document(d)
    embed_all(w2, docs)
    w2.discard_open_part()
    assert not list((tmp_path / "chunks").glob(".part-*")) and w2.parts_written == 0
    w2.output_lock.release()  # the failed run ends without a commit
    w2.manifest.close()
    assert Manifest.load(tmp_path, "s0").parts() == [] and not list((tmp_path / "chunks").iterdir())


def test_a_part_is_committed_once_the_interval_has_passed_however_few_its_rows(tmp_path):
    """Parts of 20k rows took minutes with the real model on a CPU: an interrupted run kept nothing.
    With `commit_interval_s`, ready documents are committed once that much time has passed."""
    import time

    first, second = make_doc("a.txt", 3), make_doc("b.txt", 2)
    writer = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=10_000, commit_interval_s=30.0)
    w = ChunkFeed(writer)
    for d in (first, second):
        w.begin_document(d)
    embed_all(w, [first])
    assert Manifest.load(tmp_path, "s0").parts() == []  # too soon: nothing committed yet
    writer._last_commit = time.monotonic() - 31.0  # the interval has passed (no 30 s sleep in a test)
    embed_all(w, [second])
    committed = {rel for rel, _ in Manifest.load(tmp_path, "s0").documents()}
    assert committed == {"a.txt", "b.txt"}  # committed without close()
    w.close()
    assert len(read_chunks(tmp_path)) == 5

    # without an interval only a full part (or the close) commits
    writer = DatasetWriter(tmp_path / "none", "s0", DIM, rows_per_part=10_000)
    w = ChunkFeed(writer)
    third = make_doc("c.txt", 2)
    w.begin_document(third)
    writer._last_commit = time.monotonic() - 3600.0
    embed_all(w, [third])
    assert Manifest.load(tmp_path / "none", "s0").parts() == []
    w.close()
