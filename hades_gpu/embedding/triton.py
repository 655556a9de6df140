"""The Triton client embedder: token batches to a Triton server over gRPC, vectors back.

Selected with ``embedder=triton embedder.url=127.0.0.1:<port> embedder.model=minilm_python`` (start a
server with ``hades-serve``). It implements `hades_gpu.embedding.base.Embedder`:

* at construction: server-live and model-ready checks, then the model's config is read
  (``max_batch_size``, input/output names and the output width). An unreachable server, a missing or
  unready model, or a model of the wrong shape is an `EmbedderError` of one line naming the URL and
  the model;
* ``embed`` is thread-safe: the pipeline calls it from ``concurrency`` (= ``embedder.max_inflight``)
  threads. A semaphore bounds the requests in flight to ``max_inflight`` however many threads call;
  each call blocks until its vectors are back, so nothing piles up on the client: when the server
  is slow, the embed stage is slow, the pipeline's bounded queues fill and its producers wait;
* a batch larger than the model's ``max_batch_size`` is sent as several requests;
* each request has a deadline (``timeout_s``); UNAVAILABLE (server gone or restarting, or its bounded
  queue full) is retried ``retries`` times with exponential backoff from ``retry_backoff_s``; any
  other error, or the last retry, raises `EmbedderError`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import numpy as np

from hades_gpu.config import EmbedderConfig
from hades_gpu.embedding.base import EmbedderError

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
_RETRYABLE = ("StatusCode.UNAVAILABLE",)
_MAX_BACKOFF_S = 30.0
_CHECK_TIMEOUT_S = 10.0  # deadline of each start-up check


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class TritonEmbedder:
    """Embeds token batches on a Triton server (implements `Embedder`).

    Args:
        cfg (EmbedderConfig): ``url`` (host:port of the gRPC endpoint), ``model``, ``max_inflight``,
            ``timeout_s``, ``retries``, ``retry_backoff_s``, ``dim``.

    Shapes:
        embed: input_ids int64 (B, L), attention_mask int64 (B, L) -> float32 (B, dim)
    """

    def __init__(self, cfg: EmbedderConfig):
        from hades_gpu.optional import require

        grpcclient = require("tritonclient.grpc", "tritonclient[grpc]==2.51.0", "embedder=triton")
        InferenceServerException = require("tritonclient.utils", "tritonclient[grpc]==2.51.0",
                                           "embedder=triton").InferenceServerException
        if cfg.max_inflight < 1:
            raise ValueError(f"embedder.max_inflight must be >= 1 (got {cfg.max_inflight})")
        self._grpc = grpcclient
        self._exc = InferenceServerException
        self.cfg = cfg
        self.url = cfg.url
        self.model = cfg.model
        self.concurrency = int(cfg.max_inflight)
        self._inflight = threading.BoundedSemaphore(self.concurrency)
        self._ids = itertools.count()
        self._closed = False
        self._where = f"Triton at {self.url} model {self.model!r}"
        try:
            self._client = grpcclient.InferenceServerClient(url=self.url)
        except Exception as err:  # a malformed URL
            raise EmbedderError(f"{self._where}: cannot create a gRPC client: {_one_line(err)}") from err
        try:
            self._check_server()
        except BaseException:
            self._client.close()
            raise
        self.description = f"triton {self.model} @ {self.url} (max batch {self.max_batch_size or 'any'}, " \
                           f"{self.concurrency} in flight)"
        log.info("triton embedder: %s", self.description)

    # ---------------------------------------------------------------------------------- start-up
    def _check_server(self) -> None:
        where = self._where
        try:
            live = self._client.is_server_live(client_timeout=_CHECK_TIMEOUT_S)
        except self._exc as err:
            raise EmbedderError(f"{where}: server unreachable ({_one_line(err)}); start one with hades-serve") from err
        if not live:
            raise EmbedderError(f"{where}: server is not live")
        try:
            ready = self._client.is_model_ready(self.model, client_timeout=_CHECK_TIMEOUT_S)
        except self._exc as err:
            raise EmbedderError(f"{where}: model-ready check failed ({_one_line(err)})") from err
        if not ready:
            raise EmbedderError(f"{where}: model is not ready on the server ({self._known_models()})")
        try:
            config = self._client.get_model_config(self.model, client_timeout=_CHECK_TIMEOUT_S).config
        except self._exc as err:
            raise EmbedderError(f"{where}: cannot read the model config ({_one_line(err)})") from err
        inputs = {i.name for i in config.input}
        if not set(INPUT_NAMES) <= inputs:
            raise EmbedderError(f"{where}: model must take inputs {list(INPUT_NAMES)} (got {sorted(inputs)})")
        outputs = {o.name: list(o.dims) for o in config.output}
        if OUTPUT_NAME not in outputs:
            raise EmbedderError(f"{where}: model must have output {OUTPUT_NAME!r} (got {sorted(outputs)})")
        width = outputs[OUTPUT_NAME][-1] if outputs[OUTPUT_NAME] else -1
        if width != self.cfg.dim:
            raise EmbedderError(f"{where}: output {OUTPUT_NAME!r} must be {self.cfg.dim} wide (embedder.dim) "
                                f"(got dims {outputs[OUTPUT_NAME]})")
        self.dim = int(self.cfg.dim)
        self.max_batch_size = int(config.max_batch_size)  # 0: the model takes no batch dimension
        if self.max_batch_size == 0:
            raise EmbedderError(f"{where}: model must batch (max_batch_size > 0) (got 0)")

    def _known_models(self) -> str:
        try:
            index = self._client.get_model_repository_index(client_timeout=_CHECK_TIMEOUT_S)
        except self._exc:
            return "repository index unavailable"
        states = {m.name: (m.state or "UNLOADED") for m in index.models}
        if self.model not in states:
            return f"no such model; the repository has {sorted(states) or 'none'}"
        return f"state {states[self.model]}"

    # ---------------------------------------------------------------------------------- embedding
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Mean-pooled, L2-normalised float32 (B, dim) from the server. Thread-safe; blocks until done."""
        if self._closed:
            raise EmbedderError(f"{self._where}: embedder is closed")
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D (got {ids.ndim} dimensions)")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape} (got {mask.shape})")
        n = ids.shape[0]
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        step = self.max_batch_size
        parts = [self._infer(ids[s:s + step], mask[s:s + step]) for s in range(0, n, step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        grpc = self._grpc
        # The request owns copies of the data (the caller's arrays may be views into a reused ring buffer).
        a = grpc.InferInput(INPUT_NAMES[0], list(ids.shape), "INT64")
        a.set_data_from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        b = grpc.InferInput(INPUT_NAMES[1], list(mask.shape), "INT64")
        b.set_data_from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        outputs = [grpc.InferRequestedOutput(OUTPUT_NAME)]
        attempt = 0
        while True:
            request_id = str(next(self._ids))
            with self._inflight:  # at most max_inflight requests on the wire, whatever the thread count
                try:
                    result = self._client.infer(self.model, [a, b], outputs=outputs, request_id=request_id,
                                                client_timeout=self.cfg.timeout_s)
                    err = None
                except self._exc as e:
                    err = e
            if err is None:
                break
            status = err.status() or ""
            if status in _RETRYABLE and attempt < self.cfg.retries and not self._closed:
                delay = min(self.cfg.retry_backoff_s * (2 ** attempt), _MAX_BACKOFF_S)
                attempt += 1
                log.warning("%s: %s; retry %d/%d in %.2f s", self._where, _one_line(err), attempt,
                            self.cfg.retries, delay)
                time.sleep(delay)
                continue
            if status == "StatusCode.DEADLINE_EXCEEDED":
                raise EmbedderError(f"{self._where}: no answer within embedder.timeout_s={self.cfg.timeout_s} s "
                                    f"for a batch of shape {list(ids.shape)}") from err
            tried = f" after {attempt + 1} attempts" if attempt else ""
            raise EmbedderError(f"{self._where}: inference failed{tried}: {_one_line(err)}") from err
        response_id = result.get_response().id
        if response_id != request_id:  # cannot happen with unary calls; a cheap guard against mix-ups
            raise EmbedderError(f"{self._where}: response id {response_id!r} does not match request {request_id!r}")
        out = result.as_numpy(OUTPUT_NAME)
        if out is None or out.shape != (ids.shape[0], self.dim):
            got = None if out is None else out.shape
            raise EmbedderError(f"{self._where}: expected output of shape {(ids.shape[0], self.dim)} (got {got})")
        return out.astype(np.float32, copy=False)

    # ---------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the gRPC channel; `embed` raises EmbedderError afterwards. Idempotent."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> "TritonEmbedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TritonEmbedder({self.description})"


def embedder_for(url: str, model: str = "minilm_python", **overrides: object) -> TritonEmbedder:
    """Convenience for scripts and tests: a `TritonEmbedder` on `url` with default settings."""
    cfg = EmbedderConfig(name="triton", url=url, model=model)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"EmbedderConfig has no field {key!r}")
        setattr(cfg, key, value)
    return TritonEmbedder(cfg)


__all__ = ["TritonEmbedder", "embedder_for", "EmbedderError"]
