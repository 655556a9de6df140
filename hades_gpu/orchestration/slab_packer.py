"""Pack chunks into length-sorted, token-budget batches written straight into shared-memory slabs.

This is what each worker process runs after chunking a document (and what the main process runs
for documents already in memory, `pipeline.ChunkedDocuments`): the profile's look-ahead batcher
(`LengthSortedBatcher`: `max_batch_tokens`, length buckets, look-ahead) decides which chunks go
together; `fill_slab` writes their padded ids, masks and row columns into a granted slab, and the
packer reports a small `SlabBatch` header. Batches that find no free slab wait in a bounded backlog
while the worker goes on chunking. The rows' texts go into the slab's text area, or with the
header when they do not fit it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional, Sequence

import numpy as np

from hades_gpu.gpu.slabs import CHUNK_ID_BYTES, SlabView
from hades_gpu.orchestration.batcher import BatchPlan, LengthSortedBatcher, write_padded
from hades_gpu.records import Chunk, SlabBatch


class PackedRow:
    """A chunk with the key of the document attempt it belongs to (what the batcher sorts)."""

    __slots__ = ("key", "chunk", "n_tokens", "token_ids")

    def __init__(self, key: int, chunk: Chunk) -> None:
        self.key = key
        self.chunk = chunk
        self.token_ids = chunk.token_ids
        self.n_tokens = int(chunk.token_ids.shape[0])


def fill_slab(plan: BatchPlan, view: SlabView, slab: int, cls_id: int, sep_id: int, pad_id: int) -> SlabBatch:
    """Write one plan's padded ids, mask and row columns into `view`; the header describing it."""
    rows_: Sequence[PackedRow] = plan.chunks  # type: ignore[assignment]
    rows, length = len(rows_), plan.length
    ids, mask = view.tokens(rows, length)
    lengths = write_padded([row.token_ids for row in rows_], ids, mask, cls_id, sep_id, pad_id)
    chunks = [row.chunk for row in rows_]
    keys = [row.key for row in rows_]
    view.column("doc_key")[:rows] = keys
    counts: dict[int, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    view.column("ordinal")[:rows] = [c.ordinal for c in chunks]
    view.column("char_start")[:rows] = [c.char_start for c in chunks]
    view.column("char_end")[:rows] = [c.char_end for c in chunks]
    view.column("n_tokens")[:rows] = [row.n_tokens for row in rows_]
    id_bytes = "".join(c.chunk_id for c in chunks).encode("ascii")
    if len(id_bytes) != rows * CHUNK_ID_BYTES:
        raise ValueError(f"chunk ids must be {CHUNK_ID_BYTES} ASCII characters each")
    view.column("chunk_id")[: rows * CHUNK_ID_BYTES] = np.frombuffer(id_bytes, dtype=np.uint8)
    texts = [c.text.encode("utf-8") for c in chunks]
    offsets = view.column("text_offsets")
    offsets[0] = 0
    offsets[1:rows + 1] = np.cumsum([len(t) for t in texts], dtype=np.int64)
    blob = b"".join(texts)
    area = view.column("text")
    inline: Optional[bytes] = None
    if len(blob) <= area.shape[0]:
        area[: len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    else:
        inline = blob
    real = int(lengths.sum()) + 2 * rows
    return SlabBatch(slab=slab, rows=rows, length=length, real_tokens=real, text_len=len(blob), inline_text=inline,
                     doc_counts=list(counts.items()))


class SlabPacker:
    """A look-ahead window of chunks, cut into batches that are written into slabs as slabs come.

    The batcher cuts a full window into many batches at once (about `lookahead_batches`), more than
    the slabs a worker holds. Batches without a slab wait in a backlog while the worker goes on
    reading and chunking; it blocks on a slab only when the backlog exceeds `max_backlog` batches
    (the memory bound) or when it flushes. Blocking on every missing slab made each worker wait for
    the main process's round trip tens of times per window (measured: ~0.1 s per worker on a 1.4 s
    feed run).

    Args:
        batcher (LengthSortedBatcher): the profile's batch policy.
        special_ids (tuple[int, int, int]): (CLS, SEP, PAD).
        acquire (callable): ``acquire(block) -> slab index``: blocks until one is granted when
            `block`, else returns None when none is free now.
        view (callable): the `SlabView` of a slab index.
        emit (callable): receives each filled `SlabBatch`.
        max_backlog (int): batches that may wait for a slab before `add` blocks (default: one
            look-ahead window's worth).
    """

    def __init__(self, batcher: LengthSortedBatcher, special_ids: tuple[int, int, int],
                 acquire: Callable[[bool], Optional[int]], view: Callable[[int], SlabView],
                 emit: Callable[[SlabBatch], None], max_backlog: Optional[int] = None) -> None:
        self.batcher = batcher
        self.cls_id, self.sep_id, self.pad_id = special_ids
        self._acquire = acquire
        self._view = view
        self._emit = emit
        self._backlog: deque[BatchPlan] = deque()
        self.max_backlog = max(0, int(max_backlog if max_backlog is not None
                                      else batcher.window_tokens // max(1, batcher.max_batch_tokens)))
        self.buffered_rows = 0  # in the window or the backlog: not yet in a slab

    @property
    def backlog(self) -> int:
        """Batches cut and waiting for a slab."""
        return len(self._backlog)

    def add(self, key: int, chunks: Sequence[Chunk]) -> None:
        """Add one document's chunks; batches of a full window go into slabs as slabs are free."""
        rows = [PackedRow(key, c) for c in chunks]
        self.buffered_rows += len(rows)
        self._backlog.extend(self.batcher.add(rows))  # type: ignore[arg-type]
        self.write_backlog(block=False)

    def flush(self) -> None:
        """Write every buffered chunk (idle worker, end of input), waiting for slabs as needed."""
        self._backlog.extend(self.batcher.flush())
        self.write_backlog(block=True)

    def write_backlog(self, block: bool) -> None:
        """Write waiting batches into free slabs; with `block`, all of them, else as many as there are
        free slabs, and then (blocking) only what exceeds `max_backlog`."""
        while self._backlog:
            must_wait = block or len(self._backlog) > self.max_backlog
            slab = self._acquire(must_wait)
            if slab is None:
                return
            plan = self._backlog.popleft()
            t0 = time.perf_counter()
            batch = fill_slab(plan, self._view(slab), slab, self.cls_id, self.sep_id, self.pad_id)
            batch.busy_s = time.perf_counter() - t0
            self.buffered_rows -= batch.rows
            self._emit(batch)


__all__ = ["PackedRow", "SlabPacker", "fill_slab"]
