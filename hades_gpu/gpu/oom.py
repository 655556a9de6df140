"""CUDA out-of-memory handling for a model batch: split it in halves and retry, never drop a row.

A batch that does not fit is cut into two halves (rows ``[0, B//2)`` and ``[B//2, B)``), each retried
the same way, and the results are put back together in the original row order, so the caller cannot
tell a split run from an unsplit one. Only a single row that still does not fit is an error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


class OomSplitError(RuntimeError):
    """A single row does not fit in device memory: splitting cannot help."""


def is_cuda_oom(err: Optional[BaseException]) -> bool:
    """True for CUDA out-of-memory errors: torch's own class, a RuntimeError saying so, or an error
    raised while handling one (an OOM inside CUDA graph capture surfaces as "operation failed due to
    a previous error during capture", with the OOM as its context)."""
    try:
        import torch

        oom_type: Optional[type] = torch.cuda.OutOfMemoryError
    except (ImportError, AttributeError):  # pragma: no cover - torch is a hard dependency
        oom_type = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if oom_type is not None and isinstance(err, oom_type):
            return True
        if isinstance(err, RuntimeError):
            text = str(err)
            if "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text:
                return True
        err = err.__cause__ or err.__context__
    return False


def release_cuda_cache() -> None:
    """Give the caching allocator's unused blocks back to the driver (no-op without CUDA)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort: the retry itself reports a real failure
        pass


@dataclass
class SplitCounter:
    """Counts OOM errors and splits (thread-safe); the embedder reports them in the metrics."""

    oom_errors: int = 0  # forward calls that raised OOM
    splits: int = 0  # batches cut in two
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, oom_errors: int = 0, splits: int = 0) -> None:
        with self._lock:
            self.oom_errors += oom_errors
            self.splits += splits


def embed_with_oom_split(
    forward: Callable[[np.ndarray, np.ndarray], np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    is_oom: Callable[[BaseException], bool] = is_cuda_oom,
    *,
    on_oom: Optional[Callable[[], None]] = release_cuda_cache,
    counter: Optional[SplitCounter] = None,
) -> np.ndarray:
    """Run `forward` on the batch, halving it recursively on out-of-memory.

    Args:
        forward (callable): ``(input_ids, attention_mask) -> (B, dim)`` array.
        input_ids (np.ndarray): int64 (B, L).
        attention_mask (np.ndarray): int64 (B, L).
        is_oom (callable, optional): which exceptions count as out-of-memory (default: CUDA OOM).
        on_oom (callable, optional): called after each OOM, before the retry (default: empty the
            CUDA cache). None skips it.
        counter (SplitCounter, optional): OOM errors and splits are added here.

    Returns:
        np.ndarray: (B, dim), row i computed from input row i.

    Raises:
        OomSplitError: a single row runs out of memory (chained to the OOM error).
        Any other exception from `forward` unchanged.

    Shapes:
        input_ids, attention_mask: (B, L) -> (B, dim)
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids and attention_mask must be equal (B, L) arrays "
                         f"(got {input_ids.shape} and {attention_mask.shape})")
    rows = int(input_ids.shape[0])
    if rows == 0:
        raise ValueError("cannot embed an empty batch (got 0 rows)")
    oom = False
    try:
        return forward(input_ids, attention_mask)
    except Exception as err:
        if not is_oom(err):
            raise
        if counter is not None:
            counter.add(oom_errors=1)
        if rows == 1:
            if on_oom is not None:
                on_oom()
            real = int(attention_mask[0].sum())
            raise OomSplitError(
                f"a single row of length {input_ids.shape[1]} ({real} real tokens) does not fit in device "
                f"memory even after splitting; lower embedder.max_seq_len or free the GPU"
            ) from err
        oom = True
    # Outside the `except` block: the exception and its traceback (whose frames hold the failed
    # batch's device tensors) are gone, so the cache can really be emptied before the retry.
    assert oom
    if on_oom is not None:
        on_oom()
    if counter is not None:
        counter.add(splits=1)
    mid = rows // 2
    kwargs = dict(on_oom=on_oom, counter=counter)
    first = embed_with_oom_split(forward, input_ids[:mid], attention_mask[:mid], is_oom, **kwargs)
    second = embed_with_oom_split(forward, input_ids[mid:], attention_mask[mid:], is_oom, **kwargs)
    return np.concatenate([np.asarray(first), np.asarray(second)], axis=0)
