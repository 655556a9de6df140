"""The one interface every embedder implements (local runtimes and the Triton client)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class EmbedderError(RuntimeError):
    """An embedder cannot serve requests (server gone, model missing, runtime failed)."""


@runtime_checkable
class Embedder(Protocol):
    """Turns padded token batches into mean-pooled, L2-normalised float32 vectors.

    `embed` is thread-safe: the pipeline calls it from `concurrency` threads at once so that
    runtimes which release the GIL (OpenVINO, ONNX Runtime, torch, gRPC) overlap requests.

    Shapes:
        input_ids: int64 (B, L); attention_mask: int64 (B, L) -> float32 (B, dim)
    """

    dim: int
    concurrency: int  # how many threads should call `embed` at once for full throughput
    max_batch_size: int  # largest B accepted (0 = unbounded)
    description: str  # e.g. "openvino bf16 CPU", for metrics and logs

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
