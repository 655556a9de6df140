"""`DocumentList`: discovery's documents as columns give back exactly the refs put in (odd names,
several roots, paths that are not root + relative path), behave as the list they replace, pickle,
and hold a fraction of the memory of `DocumentRef` objects."""

from __future__ import annotations

import gc
import os
import pickle
import tracemalloc
from pathlib import Path

import pytest

from hades_gpu.config import DocumentsConfig
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.document_list import DocumentList, as_document_list
from hades_gpu.orchestration.pipeline import LargestFirst
from hades_gpu.records import CODE, PROSE, DocumentRef


def _refs() -> list[DocumentRef]:
    return [
        DocumentRef(path="/corpus/a/readme.md", rel_path="a/readme.md", size=10, modality=PROSE, language="markdown",
                    mtime_ns=1_700_000_000_123_456_789),
        DocumentRef(path="/corpus/b/x.py", rel_path="b/x.py", size=2**40, modality=CODE, language="python", mtime_ns=5),
        DocumentRef(path="/other/root/y.py", rel_path="y.py", size=0, modality=CODE, language="python"),
        # a name that is not UTF-8: rel_path is escaped, path keeps the surrogate, the raw bytes travel along
        DocumentRef(path=os.fsdecode(b"/corpus/caf\xe9.txt"), rel_path=os.fsdecode(b"caf\xe9.txt"), size=3,
                    modality=PROSE, language="text"),
        DocumentRef(path="/elsewhere/file.md", rel_path="renamed.md", size=7, modality=PROSE, language="markdown"),
        DocumentRef(path="/corpus/ünï cödé/ß.md", rel_path="ünï cödé/ß.md", size=9, modality=PROSE, language="markdown"),
        DocumentRef(path="/corpus/file.md", rel_path="", size=1, modality=PROSE, language="markdown"),
    ]


def test_round_trip_is_exact() -> None:
    refs = _refs()
    docs = DocumentList(refs)
    assert len(docs) == len(refs) and list(docs) == refs and docs == refs
    for i, ref in enumerate(refs):
        got = docs[i]
        assert got == ref and got.rel_path_bytes == ref.rel_path_bytes and got.path_bytes == ref.path_bytes
        assert got.doc_id == ref.doc_id
    assert docs[3].rel_path_raw == b"caf\xe9.txt" and docs[3].rel_path == "caf\\xe9.txt"
    assert docs[-1] == refs[-1]
    with pytest.raises(IndexError):
        docs[len(refs)]
    assert docs.sizes().tolist() == [r.size for r in refs]


def test_behaves_as_the_list_it_replaces() -> None:
    refs = _refs()
    docs = DocumentList(refs)
    assert docs[1:4] == refs[1:4] and isinstance(docs[1:4], DocumentList) and docs[::-2] == refs[::-2]
    assert docs.take([4, 0, 4]) == [refs[4], refs[0], refs[4]]
    assert docs + refs[:2] == refs + refs[:2] and refs[:2] + docs == refs[:2] + refs
    assert docs + docs == refs + refs and isinstance(docs + docs, DocumentList)
    assert docs != refs[:-1] and docs != list(reversed(refs))
    assert refs[2] in docs and docs.index(refs[2]) == 2
    assert as_document_list(docs) is docs and as_document_list(iter(refs)) == refs
    copy = pickle.loads(pickle.dumps(docs))
    assert copy == refs
    empty = DocumentList()
    assert not empty and len(empty) == 0 and list(empty) == [] and empty.sizes().size == 0


def test_largest_first_keeps_discovery_order_among_equal_sizes() -> None:
    sizes = [5, 9, 5, 1, 9, 5]
    docs = DocumentList(DocumentRef(path=f"/c/{i}.md", rel_path=f"{i}.md", size=s, modality=PROSE,
                                    language="markdown") for i, s in enumerate(sizes))
    todo = LargestFirst(docs)
    order = []
    while len(todo):
        index, ref = todo.popleft()
        assert ref == docs[index]
        order.append(index)
    assert order == [1, 4, 0, 2, 5, 3]
    with pytest.raises(IndexError):
        todo.popleft()


def test_discovered_documents_hold_a_fraction_of_the_memory_of_objects(tmp_path: Path) -> None:
    """5,000 files: the columns hold under 100 bytes a document (relative paths ~25 characters);
    `DocumentRef` objects held ~350."""
    for d in range(50):
        folder = tmp_path / f"dir{d:03d}"
        folder.mkdir()
        for f in range(100):
            (folder / f"file{f:05d}.md").write_text("x")
    gc.collect()
    tracemalloc.start()
    try:
        docs, skips = discover([str(tmp_path)], DocumentsConfig())
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        as_objects = list(docs)
        gc.collect()
        with_objects, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(docs) == 5000 and not skips and isinstance(docs, DocumentList)
    assert held / len(docs) < 100, held / len(docs)
    assert (with_objects - held) / len(docs) > 3 * held / len(docs)  # what a list of refs would hold
    assert docs == as_objects and docs.nbytes() / len(docs) < 70
    # what the cluster driver ships: / 2.5, not / 3: the objects' side holds the absolute path, so the
    # ratio follows the length of pytest's temp folder (2.9995 under /tmp/pytest-of-root/pytest-15)
    assert len(pickle.dumps(docs)) < len(pickle.dumps(as_objects)) / 2.5
