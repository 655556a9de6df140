"""In-process embedder for all-MiniLM-L6-v2 on the CPU: OpenVINO (default), ONNX Runtime or torch.

All three return the same vectors as sentence-transformers (mean pooling over the attention mask, L2
normalised; cosine >= 0.999 per chunk at the default precision). Which one runs:

- ``openvino`` (``runtime=auto`` on a CPU): the exported ONNX graph (pooling inside) compiled with
  ``PERFORMANCE_HINT=THROUGHPUT``; bf16 where the CPU reports BF16 in ``OPTIMIZATION_CAPABILITIES``
  (FACTS.md: ~4x sentence-transformers on an AVX-512-bf16 CPU), else f32. ``precision=int8`` loads the
  NNCF-quantized IR. A pool of ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` infer requests makes ``embed``
  thread-safe; ``concurrency`` is that number, and the call releases the GIL so callers overlap.
- ``onnxruntime``: fp32 only, the same ONNX file; the portable fallback.
- ``torch``: ``transformers.AutoModel`` in fp32, or bf16 autocast with fp32 pooling.

On CUDA the factory (`hades_gpu.embedding.factory.build_embedder`) uses ``CudaEmbedder`` instead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Optional, Protocol, Sequence

import numpy as np

from hades_gpu.config import ConfigError, EmbedderConfig
from hades_gpu.embedding import export
from hades_gpu.embedding.base import EmbedderError
from hades_gpu.optional import import_openvino

log = logging.getLogger(__name__)

RUNTIMES = ("openvino", "onnxruntime", "torch")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class _Runtime(Protocol):
    """One backend: `run` is thread-safe and returns the pooled, normalised float32 (B, dim)."""

    concurrency: int
    description: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# OpenVINO


def openvino_cpu_has_bf16(core=None) -> bool:
    """True when OpenVINO's CPU plugin reports native bf16 (AVX512_BF16 / AMX)."""
    ov = import_openvino()  # without its usage telemetry (optional.py)

    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRuntime:
    """Compiled OpenVINO model plus a pool of infer requests (one per concurrent caller)."""

    def __init__(self, cfg: EmbedderConfig):
        from hades_gpu.optional import require

        ov = require("openvino", "openvino>=2024.4", "embedder.runtime=openvino")
        core = ov.Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        precision = cfg.precision
        if precision == "int8":
            path = export.export_openvino_int8(cfg.cache_dir)
            float_part = "bf16" if "BF16" in caps else "f32"  # the ops NNCF kept in float
        else:
            path = export.export_openvino(cfg.cache_dir)
            if precision == "default":
                float_part = "bf16" if "BF16" in caps else "f32"
            elif precision == "fp32":
                float_part = "f32"
            elif precision in ("bf16", "fp16"):
                want = "BF16" if precision == "bf16" else "FP16"
                if want in caps:
                    float_part = "bf16" if precision == "bf16" else "f16"
                else:
                    log.warning("precision=%s requested but this CPU lacks %s (has %s): using f32",
                                precision, want, caps)
                    float_part = "f32"
            else:  # pragma: no cover - validate() keeps this out
                raise ValueError(f"embedder.precision must be one of default|fp32|bf16|fp16|int8 (got {precision!r})")
        config: dict[str, object] = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": float_part}
        if cfg.threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(cfg.threads)
        if cfg.streams > 0:
            config["NUM_STREAMS"] = int(cfg.streams)
        self._compiled = core.compile_model(str(path), "CPU", config)
        n = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.concurrency = max(1, n)
        self._pool: "queue.Queue" = queue.Queue()
        # Warm every request once, one at a time: the first `infer` call initialises static state in
        # OpenVINO's Python bindings, and two threads racing through that first call deadlocked
        # (both threads parked in __cxa_guard_acquire under load).
        warm_ids = np.full((1, 8), 101, dtype=np.int64)
        warm_mask = np.ones((1, 8), dtype=np.int64)
        for _ in range(self.concurrency):
            request = self._compiled.create_infer_request()
            request.infer({export.INPUT_NAMES[0]: warm_ids, export.INPUT_NAMES[1]: warm_mask})
            self._pool.put(request)
        label = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}[float_part]
        if precision == "int8":
            label = f"int8+{label}"
        streams = self._compiled.get_property("NUM_STREAMS")
        self.description = f"openvino {label} CPU ({streams} streams, {self.concurrency} requests)"
        self.precision = label

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        req = self._pool.get()  # never waits forever: every taken request is returned below
        try:
            # `infer` releases the GIL while the CPU plugin works, so `concurrency` callers overlap.
            req.infer({export.INPUT_NAMES[0]: input_ids, export.INPUT_NAMES[1]: attention_mask},
                      share_inputs=True)
            return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
        finally:
            self._pool.put(req)

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break
        self._compiled = None


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime


class OnnxRuntimeRuntime:
    """ONNX Runtime CPU session (fp32). `InferenceSession.run` is thread-safe and releases the GIL."""

    def __init__(self, cfg: EmbedderConfig):
        if cfg.precision not in ("default", "fp32"):
            raise ValueError(f"embedder.precision for runtime onnxruntime must be default or fp32 "
                             f"(got {cfg.precision!r}); use runtime=openvino for bf16/int8")
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        from hades_gpu.optional import require

        ort = require("onnxruntime", "onnxruntime>=1.18", "embedder.runtime=onnxruntime")

        path = export.export_onnx(cfg.cache_dir)
        self.concurrency = max(1, cfg.streams) if cfg.streams > 0 else 1
        threads = cfg.threads if cfg.threads > 0 else max(1, _cores() // self.concurrency)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.description = f"onnxruntime fp32 CPU ({threads} threads)"
        self.precision = "fp32"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([export.OUTPUT_NAME], {export.INPUT_NAMES[0]: input_ids,
                                                         export.INPUT_NAMES[1]: attention_mask})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._session = None


# ---------------------------------------------------------------------------------------------------
# torch


def torch_cpu_has_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TorchRuntime:
    """`transformers.AutoModel` on the CPU; bf16 autocast for the encoder, fp32 pooling."""

    def __init__(self, cfg: EmbedderConfig):
        import torch

        if cfg.precision not in ("default", "fp32", "bf16"):
            raise ValueError(f"embedder.precision for runtime torch on CPU must be default, fp32 or bf16 "
                             f"(got {cfg.precision!r})")
        if cfg.threads > 0:
            torch.set_num_threads(int(cfg.threads))  # process-wide: torch has no per-model setting
        self._bf16 = cfg.precision == "bf16" or (cfg.precision == "default" and torch_cpu_has_bf16())
        self._model = export.load_torch_model()
        self.concurrency = 1  # torch already spreads one call over all intra-op threads
        self.precision = "bf16" if self._bf16 else "fp32"
        self.description = f"torch {self.precision} CPU ({torch.get_num_threads()} threads)"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        ids = torch.from_numpy(input_ids)
        mask = torch.from_numpy(attention_mask)
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16):
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
            out = export.mean_pool_normalize(hidden.float(), mask)  # fp32 pooling, (B, H)
        return out.numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self._model = None


# ---------------------------------------------------------------------------------------------------
# the embedder


def _resolve_runtime(cfg: EmbedderConfig) -> str:
    if cfg.runtime != "auto":
        if cfg.runtime not in RUNTIMES:
            raise ValueError(f"embedder.runtime must be one of auto|{'|'.join(RUNTIMES)} (got {cfg.runtime!r})")
        return cfg.runtime
    from hades_gpu.optional import available

    if available("openvino"):
        return "openvino"
    fallback = "onnxruntime" if cfg.precision in ("default", "fp32") and available("onnxruntime") else "torch"
    log.warning("package 'openvino' is not installed (pip install openvino): embedder.runtime=auto "
                "falls back to %s", fallback)
    return fallback


MODEL_MAX_POSITIONS = 512  # max_position_embeddings of all-MiniLM-L6-v2 (its config.json)


def check_model_settings(cfg: EmbedderConfig) -> None:
    """`embedder.dim` and `max_seq_len` against the MiniLM model the local embedders run: a ConfigError,
    one line naming the key (it was a traceback). Checked by the ingest before it writes anything."""
    if cfg.dim != export.DIM:
        raise ConfigError(f"embedder.dim must be {export.DIM} for all-MiniLM-L6-v2 (got {cfg.dim})")
    if cfg.max_seq_len > MODEL_MAX_POSITIONS:  # the model's position table: longer rows failed in the runtime
        raise ConfigError(f"embedder.max_seq_len must be <= {MODEL_MAX_POSITIONS} for all-MiniLM-L6-v2 "
                          f"(got {cfg.max_seq_len})")


class LocalEmbedder:
    """The in-process CPU embedder (implements `hades_gpu.embedding.base.Embedder`).

    Args:
        cfg (EmbedderConfig): ``runtime`` (auto|openvino|onnxruntime|torch), ``precision``
            (default|fp32|bf16|fp16|int8), ``threads``, ``streams``, ``cache_dir``. ``device`` must
            resolve to the CPU (the factory hands CUDA to ``CudaEmbedder``).

    Shapes:
        embed: input_ids int64 (B, L), attention_mask int64 (B, L), L <= max_seq_len -> float32 (B, 384)
    """

    def __init__(self, cfg: Optional[EmbedderConfig] = None):
        cfg = cfg or EmbedderConfig()
        if cfg.device not in ("auto", "cpu"):
            raise ValueError(f"LocalEmbedder runs on the CPU: embedder.device must be auto or cpu "
                             f"(got {cfg.device!r}); build_embedder() picks CudaEmbedder for CUDA")
        check_model_settings(cfg)
        self.cfg = cfg
        self.runtime_name = _resolve_runtime(cfg)
        if self.runtime_name == "openvino":
            self._rt: Optional[_Runtime] = OpenVinoRuntime(cfg)
        elif self.runtime_name == "onnxruntime":
            self._rt = OnnxRuntimeRuntime(cfg)
        else:
            self._rt = TorchRuntime(cfg)
        self.dim = export.DIM
        self.max_seq_len = int(cfg.max_seq_len)
        self.max_batch_size = 0  # CPU runtimes take any batch; the batcher's token budget bounds it
        self.concurrency = self._rt.concurrency
        self.precision = getattr(self._rt, "precision", cfg.precision)
        self.description = self._rt.description
        self._closed = threading.Event()
        log.info("local embedder: %s", self.description)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Mean-pooled, L2-normalised float32 (B, 384) for a padded batch. Thread-safe."""
        ids = _as_int64("input_ids", input_ids)
        mask = _as_int64("attention_mask", attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape} (got {mask.shape})")
        if ids.shape[1] == 0 or ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length must be in [1, {self.max_seq_len}] (got {ids.shape[1]})")
        if ids.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rt = self._rt
        if rt is None or self._closed.is_set():
            raise EmbedderError("embedder is closed")
        try:
            out = rt.run(ids, mask)
        except Exception as err:
            raise EmbedderError(f"{self.description} failed on a batch of shape {ids.shape}: {err}") from err
        if out.shape != (ids.shape[0], self.dim):
            raise EmbedderError(f"runtime returned shape {out.shape} (expected {(ids.shape[0], self.dim)})")
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, 384) for raw strings, tokenized as ingest tokenizes chunks. Thread-safe."""
        from hades_gpu.embedding.texts import embed_texts_locally

        return embed_texts_locally(self, texts, self.max_seq_len)

    def close(self) -> None:
        """Release the runtime; `embed` raises EmbedderError afterwards. Idempotent."""
        self._closed.set()
        rt, self._rt = self._rt, None
        if rt is not None:
            rt.close()

    def __enter__(self) -> "LocalEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalEmbedder({self.description})"


def _as_int64(name: str, a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (got {arr.ndim} dimensions)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array (got {arr.dtype})")
    return np.ascontiguousarray(arr, dtype=np.int64)
