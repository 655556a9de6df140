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
  queue full) and NOT_FOUND (a model that was ready at start and is unloading: a server stopping
  or restarting gracefully) are retried ``retries`` times with exponential backoff from
  ``retry_backoff_s``; any other error, or the last retry, raises `EmbedderError`;
* ``embed_texts`` sends raw strings to ``embedder.text_model`` (the ``minilm_text`` ensemble: the
  server's tokenizer model, then ``model``), with the same bound, deadline and retries; that model
  is checked on the first call, so a server without it still serves ``embed``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Optional, Sequence

import numpy as np

from hades_gpu.config import ConfigError, EmbedderConfig, check_grpc_url
from hades_gpu.embedding.base import EmbedderError

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
TEXT_INPUT = "text"  # the raw-text model's BYTES input (triton_models/minilm_text)
# NOT_FOUND too: the model was ready at start (checked), so mid-run it is being unloaded by a server
# that stops or restarts gracefully; a restart ridden through instead of a failed run
_RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")
# one row sent alone to the same model answers the same up to float noise; another model does not
SAME_MODEL_MIN_COSINE = 0.99
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

    serves_remotely = True  # the ingest checks what the server's model answers (Manifest.check_model_probe)

    def __init__(self, cfg: EmbedderConfig):
        from hades_gpu.optional import require

        grpcclient = require("tritonclient.grpc", "tritonclient[grpc]==2.51.0", "embedder=triton")
        InferenceServerException = require("tritonclient.utils", "tritonclient[grpc]==2.51.0",
                                           "embedder=triton").InferenceServerException
        if cfg.max_inflight < 1:
            raise ValueError(f"embedder.max_inflight must be >= 1 (got {cfg.max_inflight})")
        if not cfg.retry_backoff_s >= 0:  # time.sleep(-1) raised at the first retry, mid-run
            raise ValueError(f"embedder.retry_backoff_s must be >= 0 (got {cfg.retry_backoff_s})")
        check_grpc_url(cfg.url, "embedder.url")
        if not str(cfg.model or "").strip():
            raise ConfigError("embedder.model is empty: name the model the Triton server serves (e.g. minilm_python)")
        self._grpc = grpcclient
        self._exc = InferenceServerException
        self.cfg = cfg
        self.url = cfg.url
        self.model = cfg.model
        self.concurrency = int(cfg.max_inflight)
        self._inflight = threading.BoundedSemaphore(self.concurrency)
        self._ids = itertools.count()
        self._closed = False
        self._text_lock = threading.Lock()
        # the same model after an outage (`_check_same_model`): a row and the answer it first got
        self._reference: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._outages = 0  # retryable failures seen (server gone or restarting)
        self._checked_outages = 0  # ... up to which the server was checked to answer as before
        self._model_changed: Optional[EmbedderError] = None
        self._state_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._text_batch = 0  # the text model's max_batch_size once checked (first embed_texts call)
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
        # raw texts (queries) go through the text model, which tokenizes on the server, then this one
        self.query_description = f"triton {cfg.text_model} -> {self.model} @ {self.url}"
        log.info("triton embedder: %s", self.description)

    # ---------------------------------------------------------------------------------- start-up
    def _check_server(self) -> None:
        where = self._where
        try:
            live = self._client.is_server_live(client_timeout=_CHECK_TIMEOUT_S)
        except self._exc as err:
            # an HTTP endpoint closes a gRPC connection at once ("Socket closed"): the port given is likely
            # the server's HTTP port (8000), not its gRPC one (8001)
            hint = (" (is this the server's HTTP port? embedder.url takes the gRPC port, 8001 by default)"
                    if "Socket closed" in str(err) else
                    "; start one with hades-serve (a server still loading its models listens only once they are loaded)")
            raise EmbedderError(f"{where}: server unreachable ({_one_line(err)}){hint}") from err
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
        if width != self.cfg.dim:  # the settings do not fit the served model: a usage error (exit 2), as max_seq_len
            raise ConfigError(f"{where}: output {OUTPUT_NAME!r} must be {self.cfg.dim} wide (embedder.dim) "
                              f"(got dims {outputs[OUTPUT_NAME]}): set embedder.dim to the model's width")
        self.dim = int(self.cfg.dim)
        served = config.parameters.get("max_seq_len")  # model.py's own limit (triton_models/*/config.pbtxt)
        served_len = served.string_value.strip() if served is not None else ""
        if served_len.isdigit() and int(self.cfg.max_seq_len) > int(served_len):
            # else every batch longer than the server's limit failed mid-run (INVALID_ARGUMENT)
            raise ConfigError(f"embedder.max_seq_len={self.cfg.max_seq_len} is more than {where} takes "
                              f"(max_seq_len {served_len} in its config.pbtxt parameters): lower it, or serve "
                              f"the model with a larger max_seq_len")
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
        out = self._request(self.model, [a, b], ids.shape[0], f"a batch of shape {list(ids.shape)}")
        if self._reference is None:
            with self._state_lock:
                if self._reference is None:
                    self._reference = (np.array(ids[:1], dtype=np.int64), np.array(mask[:1], dtype=np.int64),
                                       np.array(out[0], dtype=np.float32))
        return out

    def _check_same_model(self) -> None:
        """After an outage, the server must answer the first row it was sent as it did then, before
        any answer of the restarted server is used. Why: a server restarted with another model of
        the same name and width (a new version deployed mid-run) was ridden through by the retries,
        and its vectors were written beside the first model's, exit 0 (the ingest's model probe
        runs once, at the start). A restart that no request of this client saw (between two
        requests) is not noticed here."""
        with self._check_lock:
            if self._model_changed is not None:
                raise self._model_changed
            with self._state_lock:
                outages, reference = self._outages, self._reference
            if outages <= self._checked_outages or reference is None:
                return
            ids, mask, before = reference
            grpc = self._grpc
            a = grpc.InferInput(INPUT_NAMES[0], list(ids.shape), "INT64")
            a.set_data_from_numpy(ids)
            b = grpc.InferInput(INPUT_NAMES[1], list(mask.shape), "INT64")
            b.set_data_from_numpy(mask)
            now = self._request(self.model, [a, b], 1, "the row first embedded (checking the model after an outage)",
                                check=False)[0]
            cosine = float(np.dot(now, before) / max(float(np.linalg.norm(now) * np.linalg.norm(before)), 1e-12))
            if cosine < SAME_MODEL_MIN_COSINE:
                self._model_changed = EmbedderError(
                    f"{self._where}: since the server came back it answers with another model (cosine {cosine:.3f} "
                    f"to its first answer for the same row): nothing it embedded since is kept; serve the run's "
                    f"model again (or start a new output for the new one) and re-run to resume")
                raise self._model_changed
            self._checked_outages = outages

    def _request(self, model: str, inputs: list, rows: int, what: str, check: bool = True) -> np.ndarray:
        """One inference on `model`, bounded in flight and retried on UNAVAILABLE; (rows, dim) float32.
        After an outage the server's model is checked first (`_check_same_model`; `check=False`: this
        is that check's own request)."""
        if check and self._model_changed is not None:
            raise self._model_changed
        outputs = [self._grpc.InferRequestedOutput(OUTPUT_NAME)]
        where = f"Triton at {self.url} model {model!r}"
        attempt = 0
        while True:
            request_id = str(next(self._ids))
            with self._inflight:  # at most max_inflight requests on the wire, whatever the thread count
                try:
                    result = self._client.infer(model, inputs, outputs=outputs, request_id=request_id,
                                                client_timeout=self.cfg.timeout_s)
                    err = None
                except self._exc as e:
                    err = e
            if err is None:
                break
            status = err.status() or ""
            if status in _RETRYABLE:
                with self._state_lock:
                    self._outages += 1
            if status in _RETRYABLE and attempt < self.cfg.retries and not self._closed:
                delay = min(self.cfg.retry_backoff_s * (2 ** attempt), _MAX_BACKOFF_S)
                attempt += 1
                log.warning("%s: %s; retry %d/%d in %.2f s", where, _one_line(err), attempt,
                            self.cfg.retries, delay)
                time.sleep(delay)
                continue
            if status == "StatusCode.DEADLINE_EXCEEDED":
                raise EmbedderError(f"{where}: no answer within embedder.timeout_s={self.cfg.timeout_s} s "
                                    f"for {what}") from err
            tried = f" after {attempt + 1} attempts" if attempt else ""
            if status == "StatusCode.NOT_FOUND":  # it was ready at start: not a wrong name
                raise EmbedderError(f"{where}: the model is no longer served (the server is stopping, or its model "
                                    f"backend died){tried}: {_one_line(err)}") from err
            if "is not healthy" in str(err):  # the Python backend's stub died: Triton never starts it again
                raise EmbedderError(f"{where}: the model's backend process on the server died (restart the server; "
                                    f"a re-run resumes){tried}: {_one_line(err)}") from err
            raise EmbedderError(f"{where}: inference failed{tried}: {_one_line(err)}") from err
        response_id = result.get_response().id
        if response_id != request_id:  # cannot happen with unary calls; a cheap guard against mix-ups
            raise EmbedderError(f"{where}: response id {response_id!r} does not match request {request_id!r}")
        out = result.as_numpy(OUTPUT_NAME)
        if out is None or out.shape != (rows, self.dim):
            got = None if out is None else out.shape
            raise EmbedderError(f"{where}: expected output of shape {(rows, self.dim)} (got {got})")
        if check and model == self.model and self._outages > self._checked_outages:
            self._check_same_model()
        return out.astype(np.float32, copy=False)

    # ---------------------------------------------------------------------------------- raw text
    def _check_text_model(self) -> int:
        """The text model's max_batch_size, checked once (ready, BYTES input, output width)."""
        with self._text_lock:
            if self._text_batch:
                return self._text_batch
            model = self.cfg.text_model
            where = f"Triton at {self.url} model {model!r}"
            try:
                ready = self._client.is_model_ready(model, client_timeout=_CHECK_TIMEOUT_S)
                config = self._client.get_model_config(model, client_timeout=_CHECK_TIMEOUT_S).config if ready else None
            except self._exc as err:
                raise EmbedderError(f"{where}: cannot check the text model ({_one_line(err)})") from err
            if config is None:
                raise EmbedderError(f"{where}: model is not ready on the server (serve it with "
                                    f"hades-serve --models {model}; embedder.text_model names it)")
            inputs = {i.name: i.data_type for i in config.input}
            if TEXT_INPUT not in inputs:
                raise EmbedderError(f"{where}: model must take input {TEXT_INPUT!r} (got {sorted(inputs)})")
            outputs = {o.name: list(o.dims) for o in config.output}
            if outputs.get(OUTPUT_NAME, [-1])[-1] != self.dim:
                raise EmbedderError(f"{where}: output {OUTPUT_NAME!r} must be {self.dim} wide (got {outputs})")
            if config.max_batch_size < 1:
                raise EmbedderError(f"{where}: model must batch (max_batch_size > 0) (got {config.max_batch_size})")
            self._text_batch = int(config.max_batch_size)
            return self._text_batch

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim) for raw strings: the server tokenizes (`embedder.text_model`, the
        `minilm_text` ensemble) exactly as ingest does. Thread-safe; bounded in flight like `embed`."""
        if self._closed:
            raise EmbedderError(f"{self._where}: embedder is closed")
        texts = list(texts)
        encoded = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts must be str (item {i} is {type(t).__name__})")
            try:
                encoded.append(t.encode("utf-8"))
            except UnicodeEncodeError as err:  # a lone surrogate: not text the server can decode
                raise ValueError(f"texts must be valid Unicode (item {i}: {err.reason} at {err.start})") from err
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        step = self._check_text_model()
        parts = []
        for s in range(0, len(encoded), step):
            # BYTES [n, 1]: one string per batch row (the model's dims are [1]); UTF-8 on the wire
            data = np.array([[b] for b in encoded[s:s + step]], dtype=np.object_)
            text_in = self._grpc.InferInput(TEXT_INPUT, list(data.shape), "BYTES")
            text_in.set_data_from_numpy(data)
            parts.append(self._request(self.cfg.text_model, [text_in], data.shape[0], f"{data.shape[0]} texts"))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

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
