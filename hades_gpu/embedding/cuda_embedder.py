"""The local embedder on CUDA: MiniLM in bf16/fp16, fp32 pooling, static bucket shapes, CUDA graphs,
side-stream copies, the NVML governor and OOM splitting. Also runs on the CPU (fp32) for tests.

Per `embed(input_ids, attention_mask)` call:

1. governor: while device memory is above ``gpu.mem_high`` the calling thread waits (until below
   ``gpu.mem_low``, at most `max_wait_s`). Batches are sized by the pipeline's batcher from the same
   governor's token budget; the embedder does not cut them again.
2. each piece goes through `embed_with_oom_split` (a CUDA OOM halves it and retries, rows kept in
   order) into the `StreamProducer` (H2D on a copy stream, compute, D2H on a d2h stream).
3. compute pads the piece on the device to its bucket, ``(row_bucket(B), padded_length(L))`` with
   ``padded_length(L) = min(round_up(L, length_bucket), max_position_embeddings)`` (a bucket that
   does not divide the model's length must not ask for positions the model lacks), and runs it
   either eagerly or by replaying the CUDA graph captured for that bucket
   (`hades_gpu.gpu.cuda_graphs.GraphCache`: its own capture stream on this device, one capture at a
   time in the process).

Under memory pressure (the governor throttles, or a CUDA OOM) the captured graphs are dropped and the
allocator's cache emptied: a graph pins its memory pool, so this is the only way to give it back.
After an OOM the governor holds the budget down for ``gpu.oom_hold_s`` and no bucket is captured in
that time; buckets are captured again once the pressure is gone.

Why a hand-written forward instead of calling the transformers module: the weights are loaded by
``transformers.AutoModel`` (same checkpoint, same maths), but transformers' attention-mask helpers
test the mask on the host (``torch.all(mask == 1)``) which is a device sync on every call, breaks
CUDA graph capture, and differs between transformers versions. The forward below is the BERT encoder
(post-LayerNorm, exact GELU) with a fused QKV projection and `scaled_dot_product_attention`: no host
syncs, capturable, and checked against the transformers forward in the tests.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hades_gpu.config import EmbedderConfig, PipelineConfig
from hades_gpu.embedding.base import EmbedderError
from hades_gpu.gpu.cuda_graphs import CapturePolicy, GraphCache
from hades_gpu.gpu.device import DeviceError, device_name, select_device
from hades_gpu.gpu.nvml_governor import MemoryGovernor
from hades_gpu.gpu.oom import SplitCounter, embed_with_oom_split, release_cuda_cache
from hades_gpu.gpu.stream_producer import StreamProducer

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROW_MULTIPLE = 8  # batch sizes are padded up to a multiple of this (tensor-core friendly) ...
ROW_MULTIPLE_LARGE = 32  # ... and above 64 rows to a multiple of this, so few buckets exist


def _round_up(x: int, m: int) -> int:
    return ((x + m - 1) // m) * m


def row_bucket(rows: int) -> int:
    """Rows a CUDA graph is captured for: a multiple of 8 up to 64, of 32 above."""
    return _round_up(rows, ROW_MULTIPLE if rows <= 64 else ROW_MULTIPLE_LARGE)


def load_hf_model() -> nn.Module:
    """all-MiniLM-L6-v2 as a transformers `BertModel` (fp32, CPU, eval), offline, from `model_dir()`.

    Cast to fp32 whatever the stored dtype: transformers 5 loads a checkpoint in its own dtype, and a
    packed folder (scripts/gpu_bundle.py) may hold fp16 weights.
    """
    from hades_gpu.documents.tokenizer import model_dir
    from hades_gpu.optional import require

    transformers = require("transformers", "transformers", "the CUDA embedder")
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(str(model_dir()), local_files_only=True)
    return model.to(torch.float32).eval()


class MiniLMEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation, with weights from a `BertModel`.

    For layer l: ``x = LN(x + W_o · Attn(x)); x = LN(x + W_2 · gelu(W_1 · x))`` with
    ``Attn = softmax(QK^T / sqrt(d_head) + mask) V`` over ``num_attention_heads`` heads. Pooling is
    done in fp32 whatever the compute dtype: ``e = normalize(Σ_t m_t h_t / max(Σ_t m_t, 1e-9))``.

    Shapes:
        input_ids: int64 (B, L); attention_mask: int64 (B, L) -> float32 (B, hidden)
        Every row must attend to at least one position (padding rows carry a 1 in column 0).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        cfg = hf_model.config
        if getattr(cfg, "model_type", "bert") != "bert" or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise EmbedderError(f"MiniLMEncoder expects a BERT model with absolute positions (got "
                                f"{cfg.model_type}, {getattr(cfg, 'position_embedding_type', None)})")
        if cfg.hidden_act not in ("gelu", "gelu_python"):
            raise EmbedderError(f"MiniLMEncoder implements hidden_act 'gelu' (got {cfg.hidden_act!r})")
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = self.hidden // self.heads
        self.eps = float(cfg.layer_norm_eps)
        self.max_positions = int(cfg.max_position_embeddings)
        self.intermediate = int(cfg.intermediate_size)
        emb = hf_model.embeddings

        def p(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone(), requires_grad=False)

        self.word = p(emb.word_embeddings.weight)  # (V, H)
        self.position = p(emb.position_embeddings.weight)  # (P, H)
        self.token_type0 = p(emb.token_type_embeddings.weight[0])  # (H,): every token is segment 0
        self.emb_ln_w, self.emb_ln_b = p(emb.LayerNorm.weight), p(emb.LayerNorm.bias)
        self.layers = nn.ModuleList()
        for layer in hf_model.encoder.layer:
            att = layer.attention
            m = nn.Module()
            m.qkv_w = p(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight], 0))  # (3H, H)
            m.qkv_b = p(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias], 0))  # (3H,)
            m.o_w, m.o_b = p(att.output.dense.weight), p(att.output.dense.bias)
            m.ln1_w, m.ln1_b = p(att.output.LayerNorm.weight), p(att.output.LayerNorm.bias)
            m.i_w, m.i_b = p(layer.intermediate.dense.weight), p(layer.intermediate.dense.bias)
            m.f_w, m.f_b = p(layer.output.dense.weight), p(layer.output.dense.bias)
            m.ln2_w, m.ln2_b = p(layer.output.LayerNorm.weight), p(layer.output.LayerNorm.bias)
            self.layers.append(m)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        H, nh, hd = self.hidden, self.heads, self.head_dim
        x = F.embedding(input_ids, self.word) + self.position[:L] + self.token_type0  # (B, L, H)
        x = F.layer_norm(x, (H,), self.emb_ln_w, self.emb_ln_b, self.eps)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): True = attend
        for m in self.layers:
            qkv = F.linear(x, m.qkv_w, m.qkv_b)  # (B, L, 3H)
            q, k, v = qkv.view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, L, hd)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, nh, L, hd)
            a = a.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
            x = F.layer_norm(F.linear(a, m.o_w, m.o_b) + x, (H,), m.ln1_w, m.ln1_b, self.eps)
            h = F.gelu(F.linear(x, m.i_w, m.i_b))  # (B, L, 4H), exact (erf) GELU as in BERT
            x = F.layer_norm(F.linear(h, m.f_w, m.f_b) + x, (H,), m.ln2_w, m.ln2_b, self.eps)
        # fp32 masked mean pooling and normalisation, whatever the compute dtype
        w = attention_mask.to(torch.float32).unsqueeze(1)  # (B, 1, L)
        summed = torch.bmm(w, x.to(torch.float32)).squeeze(1)  # (B, H)
        pooled = summed / w.sum(-1).clamp_min(1e-9)  # (B, H)
        return F.normalize(pooled, p=2.0, dim=1)  # (B, H) float32


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`embedder.precision` -> compute dtype. default: bf16 on a GPU that has it (compute capability
    8.0 or later, asked of *this* device, not the current one), else fp16; fp32 on the CPU."""
    if precision == "default":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.float32
    if precision not in _DTYPES:
        raise EmbedderError(f"CudaEmbedder supports embedder.precision default|fp32|bf16|fp16 (got {precision!r})")
    return _DTYPES[precision]


class CudaEmbedder:
    """`Embedder` on CUDA (and, for tests, the CPU). See the module docstring.

    Args:
        cfg (PipelineConfig or EmbedderConfig): uses ``embedder.{device, precision, dim, max_seq_len}`` (``gpu.device``
            when ``embedder.device`` is auto), ``gpu.*`` and ``profile.{max_batch_tokens,
            max_batch_size, length_bucket}``.
        governor (MemoryGovernor, optional): default: one built from ``cfg.gpu`` for the device.
        max_wait_s (float, optional): longest a call waits for memory headroom before going ahead
            with the shrunk budget (OOM splitting is the backstop) (default: 30).
        graph_after (int, optional): a bucket is captured as a CUDA graph on its n-th use, so
            one-off shapes stay eager (default: 2).
        max_graphs (int, optional): at most this many captured buckets (default: 128).

    Raises:
        EmbedderError: the device is not usable, ``embedder.dim`` or ``embedder.max_seq_len`` do not
            fit the model.
    """

    def __init__(self, cfg: PipelineConfig | EmbedderConfig, governor: Optional[MemoryGovernor] = None, *,
                 max_wait_s: float = 30.0, graph_after: int = 2, max_graphs: int = 128) -> None:
        if isinstance(cfg, EmbedderConfig):  # embedder settings only: default gpu/profile settings
            cfg = PipelineConfig(embedder=cfg)
        spec = cfg.embedder.device if cfg.embedder.device != "auto" else cfg.gpu.device
        try:
            self.device = select_device(spec)
        except DeviceError as err:
            raise EmbedderError(f"CudaEmbedder cannot use device {spec!r}: {err}") from err
        self.cuda = self.device.type == "cuda"
        self.dtype = resolve_precision(cfg.embedder.precision, self.device)
        self.dim = int(cfg.embedder.dim)
        self.length_bucket = int(cfg.profile.length_bucket)
        self.max_batch_size = int(cfg.profile.max_batch_size)
        self.concurrency = 2 if self.cuda else 1  # two threads: one's copies overlap the other's compute
        self.max_wait_s = float(max_wait_s)
        self.use_graphs = bool(cfg.gpu.cuda_graphs and self.cuda)

        hf = load_hf_model()
        if int(hf.config.hidden_size) != self.dim:
            raise EmbedderError(f"embedder.dim must match the model's hidden size (expected "
                                f"{hf.config.hidden_size}, got {self.dim})")
        self.max_positions = int(hf.config.max_position_embeddings)
        if int(cfg.embedder.max_seq_len) > self.max_positions:
            raise EmbedderError(f"embedder.max_seq_len must be <= the model's max_position_embeddings "
                                f"{self.max_positions} (got {cfg.embedder.max_seq_len})")
        self.max_seq_len = int(cfg.embedder.max_seq_len)  # embed_texts (queries) truncates like ingest
        self.max_len = self.padded_length(int(cfg.embedder.max_seq_len))
        self.encoder = MiniLMEncoder(hf).to(device=self.device, dtype=self.dtype).eval()
        del hf

        self.governor = governor if governor is not None else MemoryGovernor(
            cfg.gpu, self.device.index if self.cuda else None)
        self.splits = SplitCounter()
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self.eager_batches = 0
        self.headroom_wait_timeouts = 0
        self.policy = CapturePolicy(graph_after=graph_after, max_graphs=max_graphs)
        self.graphs: Optional[GraphCache] = None
        if self.use_graphs:
            self.graphs = GraphCache(self.encoder, self.device, self.policy, blocked=self._capture_blocked)
        max_rows = row_bucket(self.max_batch_size)
        self._max_rows = max_rows
        self.producer = StreamProducer(self.device, self._compute, self.dim, max_rows, self.max_len,
                                       side_streams=cfg.gpu.side_stream_copies,
                                       slots=2 * self.concurrency + 2)
        prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        extras = [x for x, on in (("cuda graphs", self.use_graphs), ("side streams", self.producer.side_streams)) if on]
        where = f"{self.device} ({device_name(self.device)})" if self.cuda else "cpu"
        self.description = f"torch {prec} {where}" + (f", {', '.join(extras)}" if extras else "")
        log.info("embedder: %s", self.description)

    def padded_length(self, length: int) -> int:
        """Length a batch of `length` columns runs at: rounded up to the bucket, never past the
        model's positions (a bucket of 24 and 512 positions: 512, not 528)."""
        return max(length, min(_round_up(length, self.length_bucket), self.max_positions))

    def _capture_blocked(self) -> bool:
        """No new CUDA graph while memory is short: throttling, or the hold after an OOM."""
        return self.governor.throttling or self.governor.holding

    # -- compute (called by the producer on the compute stream) --------------------------------

    def _compute(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 device tensors -> (B, dim) float32, a fresh tensor."""
        rows, length = ids.shape
        key = (row_bucket(rows), self.padded_length(length))
        with torch.inference_mode():
            if self.graphs is not None and self.use_graphs:
                out = self.graphs.run(key, ids, mask)
                if out is not None:
                    return out
            with self._stats_lock:
                self.eager_batches += 1
            if length != key[1]:  # static length bucket; padding columns are masked out
                ids = F.pad(ids, (0, key[1] - length))
                mask = F.pad(mask, (0, key[1] - length))
            return self.encoder(ids, mask)

    # -- Embedder ------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Give memory back: drop the CUDA graphs (their pool) and empty the allocator's cache."""
        if self.graphs is not None:
            self.graphs.drop()
        release_cuda_cache()

    def _on_oom(self) -> None:
        self.governor.note_oom()  # first: the hold also stops captures while memory is released
        self.release_memory()

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.producer.run(ids, mask)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Mean-pooled, L2-normalised float32 (B, dim). Thread-safe.

        Shapes:
            input_ids: int64 (B, L); attention_mask: int64 (B, L) -> float32 (B, dim)
        """
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must be equal (B, L) arrays "
                             f"(got {ids.shape} and {mask.shape})")
        rows, length = ids.shape
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if length < 1 or length > self.max_positions:
            raise ValueError(f"sequence length must be in [1, {self.max_positions}] (got {length})")
        if self._stop.is_set():
            raise EmbedderError("CudaEmbedder is closed")
        if self.governor.active and self.governor.should_wait():
            # the calling producer thread waits here while device memory is above gpu.mem_high
            if not self.governor.wait_for_headroom(self._stop, self.max_wait_s, relieve=self.release_memory):
                with self._stats_lock:
                    self.headroom_wait_timeouts += 1
        # The batcher sizes batches (from the same governor's budget); here a batch is cut only to the
        # output buffers' capacity, and by `embed_with_oom_split` when the device runs out of memory.
        per_piece = min(rows, self._max_rows)
        parts = []
        for start in range(0, rows, per_piece):
            stop = min(rows, start + per_piece)
            parts.append(embed_with_oom_split(self._forward, ids[start:stop], mask[start:stop],
                                              on_oom=self._on_oom, counter=self.splits))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return out.astype(np.float32, copy=False)

    def metrics(self) -> dict[str, Any]:
        """Counters for the run's metrics report (governor, OOM splits, graphs, copies)."""
        graphs = self.graphs.metrics() if self.graphs is not None else {
            "graphs_captured": 0, "captures": 0, "graph_capture_failures": 0, "graph_replays": 0,
            "graphs_dropped": 0, "capture_stream": "", "buckets_seen": len(self.policy.uses)}
        return {
            "description": self.description,
            **graphs,
            "eager_batches": self.eager_batches,
            "oom_errors": self.splits.oom_errors,
            "oom_splits": self.splits.splits,
            "headroom_wait_timeouts": self.headroom_wait_timeouts,
            "governor": self.governor.metrics(),
            "producer": self.producer.metrics(),
        }

    def close(self) -> None:
        """Wake any thread waiting for headroom, finish in-flight work, drop graphs and cached memory."""
        self._stop.set()
        if self.cuda:
            self.producer.close()
            if self.graphs is not None:
                self.graphs.close()
            release_cuda_cache()
        self.governor.close()


def flops_per_token(length: int, hidden: int = 384, layers: int = 6, intermediate: int = 1536) -> float:
    """Forward FLOPs per token of a BERT encoder at padded length `length` (multiply-add = 2 FLOPs).

    Per layer and token: QKV ``2·H·3H``, attention scores and weighted sum ``2·2·L·H``, output
    projection ``2·H·H``, feed-forward ``2·2·H·I``. Embeddings, LayerNorm, softmax and pooling are
    elementwise and left out (well under 1%).
    """
    per_layer = 2 * hidden * 3 * hidden + 4 * length * hidden + 2 * hidden * hidden + 4 * hidden * intermediate
    return float(layers * per_layer)


__all__ = ["CudaEmbedder", "MiniLMEncoder", "flops_per_token", "load_hf_model", "resolve_precision"]
