"""The discovered documents of a run, stored as columns: ~60 bytes a document instead of ~450.

The main process holds every discovered document for the whole run (resume check, largest-first
order, shard maps, retries). As a list of `DocumentRef` objects that was ~350 bytes a document for
short paths (the object, its `__dict__`, two path strings, two ints) and ~0.5 KB with the run's
index tuples: 5 GB of the main process at 10^7 documents, and the `low_memory` profile's bar (1.5 GB)
broken past ~2.5 million files. Here each document is one UTF-8 relative path in a shared buffer and
a few fixed-width numbers; the absolute path is its corpus root (one string per root) + the relative
path. `DocumentRef`s are made when asked for (`docs[i]`, iteration), so every caller that reads a
sequence of refs works unchanged.

Plain `array`/`bytearray` columns rather than a pyarrow or pandas table: they grow one document at a
time while discovery walks (an Arrow builder would need a second pass), and pickle as a few buffers
(the cluster driver ships a shard's documents to its task).
"""

from __future__ import annotations

from array import array
from typing import Iterable, Iterator, Optional, Sequence, overload

import numpy as np

from hades_gpu.records import DocumentRef

_TEXT = ("utf-8", "surrogatepass")  # rel_path is valid text (escaped by DocumentRef); be lossless anyway


class DocumentList(Sequence[DocumentRef]):
    """An append-only, indexable sequence of `DocumentRef`s in columnar storage (module docstring).

    Args:
        refs (iterable of DocumentRef, optional): the initial documents, in order.
    """

    def __init__(self, refs: Iterable[DocumentRef] = ()) -> None:
        self._rel = bytearray()  # every rel_path, UTF-8, back to back
        self._rel_end = array("q")  # end offset of document i's rel_path in _rel
        self._root = array("i")  # index into _roots; -1: the path is not root + rel_path (_odd_paths)
        self._size = array("q")
        self._mtime = array("q")
        self._tag = array("q")  # DocumentRef.stat_tag
        self._kind = array("H")  # index into _kinds: (modality, language)
        self._roots: list[str] = []
        self._root_ix: dict[str, int] = {}
        self._kinds: list[tuple[str, str]] = []
        self._kind_ix: dict[tuple[str, str], int] = {}
        self._odd_paths: dict[int, str] = {}  # document index -> absolute path (rare)
        self._raw: dict[int, bytes] = {}  # document index -> rel_path_raw (names that are not UTF-8)
        self.extend(refs)

    # -- building ------------------------------------------------------------------------------------
    def append(self, ref: DocumentRef) -> None:
        i = len(self._size)
        rel = ref.rel_path
        root: Optional[str] = ref.path[: len(ref.path) - len(rel)] if ref.path.endswith(rel) else None
        if root is None:
            self._odd_paths[i] = ref.path
            self._root.append(-1)
        else:
            ix = self._root_ix.get(root)
            if ix is None:
                ix = self._root_ix[root] = len(self._roots)
                self._roots.append(root)
            self._root.append(ix)
        kind = (ref.modality, ref.language)
        k = self._kind_ix.get(kind)
        if k is None:
            k = self._kind_ix[kind] = len(self._kinds)
            self._kinds.append(kind)
        self._kind.append(k)
        self._rel += rel.encode(*_TEXT)
        self._rel_end.append(len(self._rel))
        self._size.append(int(ref.size))
        self._mtime.append(int(ref.mtime_ns))
        self._tag.append(int(ref.stat_tag))
        if ref.rel_path_raw is not None:
            self._raw[i] = ref.rel_path_raw

    def extend(self, refs: Iterable[DocumentRef]) -> None:
        if isinstance(refs, DocumentList):
            refs = iter(refs)
        for ref in refs:
            self.append(ref)

    # -- reading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._size)

    def roots(self) -> list[str]:
        """The folders the documents' paths are `root + rel_path` under (in order of first use)."""
        return list(self._roots)

    def rel_path(self, i: int) -> str:
        start = self._rel_end[i - 1] if i else 0
        return self._rel[start:self._rel_end[i]].decode(*_TEXT)

    def _ref(self, i: int) -> DocumentRef:
        rel = self.rel_path(i)
        root = self._root[i]
        path = self._odd_paths[i] if root < 0 else self._roots[root] + rel
        modality, language = self._kinds[self._kind[i]]
        return DocumentRef(path=path, rel_path=rel, size=self._size[i], modality=modality, language=language,
                           mtime_ns=self._mtime[i], rel_path_raw=self._raw.get(i), stat_tag=self._tag[i])

    @overload
    def __getitem__(self, i: int) -> DocumentRef: ...

    @overload
    def __getitem__(self, i: slice) -> "DocumentList": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("DocumentList index out of range")
        return self._ref(i)

    def __iter__(self) -> Iterator[DocumentRef]:
        for i in range(len(self)):
            yield self._ref(i)

    def sizes(self) -> np.ndarray:
        """Every document's size in bytes (int64, a copy)."""
        return np.array(self._size, dtype=np.int64)

    def take(self, indices: Iterable[int]) -> "DocumentList":
        """The documents at `indices`, in that order: columns copied as they are (no `DocumentRef`
        made per document; roots and kinds keep their numbers)."""
        out = DocumentList()
        out._roots, out._root_ix = list(self._roots), dict(self._root_ix)
        out._kinds, out._kind_ix = list(self._kinds), dict(self._kind_ix)
        for i in indices:
            i = int(i)
            j = len(out._size)
            out._rel += self._rel[self._rel_end[i - 1] if i else 0:self._rel_end[i]]
            out._rel_end.append(len(out._rel))
            out._root.append(self._root[i])
            out._size.append(self._size[i])
            out._mtime.append(self._mtime[i])
            out._tag.append(self._tag[i])
            out._kind.append(self._kind[i])
            if i in self._odd_paths:
                out._odd_paths[j] = self._odd_paths[i]
            if i in self._raw:
                out._raw[j] = self._raw[i]
        return out

    def __add__(self, other: Iterable[DocumentRef]) -> "DocumentList":
        out = self.take(range(len(self)))
        out.extend(other)
        return out

    def __radd__(self, other: Iterable[DocumentRef]) -> "DocumentList":
        out = DocumentList(other)
        out.extend(self)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  (mutable, like a list)

    def __repr__(self) -> str:
        return f"DocumentList({len(self)} documents)"

    def nbytes(self) -> int:
        """Bytes held by the columns (not counting the rare odd paths and raw names)."""
        return (len(self._rel) + sum(a.itemsize * len(a) for a in (self._rel_end, self._root, self._size,
                                                                    self._mtime, self._tag, self._kind)))


def as_document_list(refs: Iterable[DocumentRef]) -> DocumentList:
    """`refs` as a `DocumentList` (itself when it is one)."""
    return refs if isinstance(refs, DocumentList) else DocumentList(refs)


__all__ = ["DocumentList", "as_document_list"]
