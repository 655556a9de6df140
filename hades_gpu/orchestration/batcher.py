"""Pack chunks into padded model batches with little padding.

Chunks are collected in a look-ahead window, sorted by length, and cut greedily into batches whose
padded size (rows x bucketed length) stays within the token budget. Sequence lengths are rounded up
to a multiple of `length_bucket`, so the runtime sees few distinct shapes. Batch tensors are written
into host buffers taken from a ring (pinned where CUDA exists) and released by the embed stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from hades_gpu.gpu.host_ring import HostBufferRing
from hades_gpu.records import Chunk, TokenBatch


def bucket_length(n: int, bucket: int, cap: int) -> int:
    """`n` rounded up to a multiple of `bucket`, at most `cap`."""
    return min(cap, -(-n // bucket) * bucket)


@dataclass
class BatchPlan:
    """Which chunks go into one batch, and its padded length."""

    chunks: list[Chunk]
    length: int

    @property
    def padded_tokens(self) -> int:
        return len(self.chunks) * self.length


class LengthSortedBatcher:
    """Groups chunks into `BatchPlan`s inside a look-ahead window.

    Args:
        max_batch_tokens (int): padded-token budget per batch (rows x bucketed length).
        max_batch_size (int): most rows per batch.
        length_bucket (int): sequence lengths are multiples of this.
        max_seq_len (int): model's longest sequence, special tokens included.
        lookahead_batches (int): window size in batches' worth of tokens.
        budget_fn (callable, optional): current token budget (the GPU governor shrinks it under
            memory pressure); default: always `max_batch_tokens`.
    """

    def __init__(self, max_batch_tokens: int, max_batch_size: int, length_bucket: int, max_seq_len: int,
                 lookahead_batches: int, budget_fn: Optional[Callable[[int], int]] = None) -> None:
        if max_batch_tokens < max_seq_len:
            raise ValueError(f"max_batch_tokens must be >= max_seq_len (got {max_batch_tokens} < {max_seq_len})")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.length_bucket = length_bucket
        self.max_seq_len = max_seq_len
        self.window_tokens = lookahead_batches * max_batch_tokens
        self._budget_fn = budget_fn
        self._window: list[Chunk] = []
        self._window_tokens = 0

    def seq_len(self, chunk: Chunk) -> int:
        return min(chunk.n_tokens + 2, self.max_seq_len)  # + [CLS], [SEP]

    def add(self, chunks: list[Chunk]) -> list[BatchPlan]:
        """Add chunks; return the batches of a full window (the last, partial one is kept back)."""
        for chunk in chunks:
            self._window.append(chunk)
            self._window_tokens += self.seq_len(chunk)
        if self._window_tokens < self.window_tokens:
            return []
        return self._cut(keep_last=True)

    def flush(self) -> list[BatchPlan]:
        """Every remaining chunk as batches (end of input)."""
        return self._cut(keep_last=False)

    def _budget(self) -> int:
        return effective_budget(self.max_batch_tokens, self.max_seq_len, self._budget_fn)

    def _cut(self, keep_last: bool) -> list[BatchPlan]:
        if not self._window:
            return []
        self._window.sort(key=self.seq_len)
        budget = self._budget()
        plans: list[BatchPlan] = []
        current: list[Chunk] = []
        length = 0
        for chunk in self._window:
            new_len = max(length, bucket_length(self.seq_len(chunk), self.length_bucket, self.max_seq_len))
            if current and ((len(current) + 1) * new_len > budget or len(current) >= self.max_batch_size):
                plans.append(BatchPlan(current, length))
                current, new_len = [], bucket_length(self.seq_len(chunk), self.length_bucket, self.max_seq_len)
            current.append(chunk)
            length = new_len
        if current:
            plans.append(BatchPlan(current, length))
        self._window = []
        self._window_tokens = 0
        if keep_last and len(plans) > 1:
            last = plans.pop()
            self._window = list(last.chunks)
            self._window_tokens = sum(self.seq_len(c) for c in self._window)
        return plans


def effective_budget(max_batch_tokens: int, max_seq_len: int, budget_fn: Optional[Callable[[int], int]]) -> int:
    """The padded-token budget now: `budget_fn`'s (the governor's) clamped to [max_seq_len, max_batch_tokens]."""
    if budget_fn is None:
        return max_batch_tokens
    return max(max_seq_len, min(max_batch_tokens, budget_fn(max_batch_tokens)))


def write_padded(token_ids: Sequence[np.ndarray], ids: np.ndarray, mask: np.ndarray,
                 cls_id: int, sep_id: int, pad_id: int) -> np.ndarray:
    """Write rows ``[CLS] content [SEP] [PAD]...`` into `ids` (B, L) and their mask; returns each
    row's content length (content cut to L - 2)."""
    length = ids.shape[1]
    ids.fill(pad_id)
    lengths = np.empty(len(token_ids), dtype=np.int64)
    for r, row in enumerate(token_ids):
        content = row[: length - 2]
        n = content.shape[0]
        ids[r, 0] = cls_id
        ids[r, 1:n + 1] = content
        ids[r, n + 1] = sep_id
        lengths[r] = n
    mask[:] = np.arange(length)[None, :] < (lengths[:, None] + 2)  # row r has lengths[r] + 2 ones
    return lengths


def fill_batch(plan: BatchPlan, ring: Optional[HostBufferRing], slot: int,
               cls_id: int, sep_id: int, pad_id: int) -> TokenBatch:
    """Write a plan's ids and mask into a ring slot (or fresh arrays when `ring` is None)."""
    rows, length = len(plan.chunks), plan.length
    if ring is None:
        ids = np.empty((rows, length), dtype=np.int64)
        mask = np.empty((rows, length), dtype=np.int64)
    else:
        ids, mask = ring.views(slot, rows, length)
    lengths = write_padded([c.token_ids for c in plan.chunks], ids, mask, cls_id, sep_id, pad_id)
    real = int(lengths.sum()) + 2 * rows
    return TokenBatch(input_ids=ids, attention_mask=mask, chunks=plan.chunks,
                      slot=slot if ring is not None else -1, real_tokens=real)
