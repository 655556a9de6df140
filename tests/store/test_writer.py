import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from hades_gpu.records import Chunk, ChunkedDocument, DocumentRef, EmbeddedBatch, stable_id
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


def embed_all(writer, docs):
    chunks = [c for d in docs for c in d.chunks]
    rng = np.random.default_rng(0)
    for i in range(0, len(chunks), 3):  # batches that cut across documents, in shuffled order
        part = chunks[i:i + 3][::-1]
        writer.add(EmbeddedBatch(chunks=part, embeddings=rng.random((len(part), DIM), dtype=np.float32)))


def test_whole_documents_per_part_and_manifest(tmp_path):
    w = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=4)
    docs = [make_doc(f"d{i}.txt", n) for i, n in enumerate([3, 2, 5, 1])]
    for d in docs:
        w.begin_document(d, size=10, mtime_ns=7)
    embed_all(w, docs)
    w.close()
    table = read_chunks(tmp_path).to_pandas()
    assert len(table) == 11 and table.chunk_id.is_unique
    for part in Manifest.load(tmp_path, "s0").parts:
        part_table = pq.read_table(tmp_path / "chunks" / f"{part}.parquet").to_pandas()
        for doc_id, rows in part_table.groupby("doc_id"):
            assert sorted(rows.ordinal) == list(range(len(rows)))  # never split across parts
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["documents"]) == {f"d{i}.txt" for i in range(4)}
    assert read_documents(tmp_path).column("references").to_pylist()[0] == ["x.md"]
    assert pq.read_schema(tmp_path / "chunks" / f"{manifest['parts'][0]}.parquet").field("embedding").type.list_size == DIM


def test_orphan_parts_are_removed_on_open(tmp_path):
    w = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100)
    d = make_doc("a.txt", 2)
    w.begin_document(d)
    embed_all(w, [d])
    w.close()
    orphan = tmp_path / "chunks" / "part-s0-00099.parquet"
    orphan.write_bytes(b"partial")
    (tmp_path / "chunks" / ".part-s0-00100.parquet.tmp-1").write_bytes(b"tmp")
    w2 = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100)
    assert not orphan.exists() and len(w2.removed_orphans) == 2
    assert len(read_chunks(tmp_path)) == 2


def test_changed_document_replaces_old_rows(tmp_path):
    w = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100)
    old, other = make_doc("a.txt", 3, "v1"), make_doc("b.txt", 2)
    for d in (old, other):
        w.begin_document(d)
    embed_all(w, [old, other])
    w.close()
    w = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100)
    new = make_doc("a.txt", 2, "v2")
    w.begin_document(new)
    embed_all(w, [new])
    w.close()
    table = read_chunks(tmp_path).to_pandas()
    assert sorted(table.text) == ["v1-0", "v1-1", "v2-0", "v2-1"]  # b's two rows + a's new two
    assert len(read_documents(tmp_path)) == 2


def test_embedding_shape_checked(tmp_path):
    w = DatasetWriter(tmp_path, "s0", DIM, rows_per_part=100)
    d = make_doc("a.txt", 1)
    w.begin_document(d)
    with pytest.raises(ValueError, match=r"embeddings must be \(1, 4\)"):
        w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.zeros((1, 3), np.float32)))
