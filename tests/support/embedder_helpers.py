"""A real embedder with every call recorded: how tests see what the pipeline asked of the model."""

from __future__ import annotations

import threading
import time

import numpy as np


class RecordingEmbedder:
    """Wraps a real embedder (not a fake: every vector is the inner one's); records each call's shape
    and real-token rows, and can slow calls down (`delay_s`) to make the pipeline's queues fill."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.dim = inner.dim
        self.concurrency = getattr(inner, "concurrency", 1)
        self.max_batch_size = getattr(inner, "max_batch_size", 0)
        self.description = f"recording({getattr(inner, 'description', type(inner).__name__)})"
        self.calls: list[tuple[int, int]] = []  # (rows, length) per call
        self.rows: list[np.ndarray] = []  # the real (unpadded) token ids of every row embedded
        self._lock = threading.Lock()

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        with self._lock:
            self.calls.append(tuple(ids.shape))
            self.rows.extend(ids[i, mask[i].astype(bool)].copy() for i in range(ids.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.embed(ids, mask)

    @property
    def rows_embedded(self) -> int:
        return len(self.rows)

    def close(self) -> None:  # the inner embedder belongs to the caller (a session fixture)
        pass
