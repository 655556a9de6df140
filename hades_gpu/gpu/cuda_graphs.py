"""CUDA graphs of a fixed-shape function, one per (rows, length) bucket, captured safely.

Why graphs: MiniLM-L6 at a few thousand tokens per batch launches ~100 small kernels per forward;
replaying a captured graph removes the per-kernel launch cost from the host thread, which on a small
model is what stands between the GPU and full use.

What makes capture safe here (each point was a defect of the first version):

- **A stream of its own.** ``torch.cuda.Stream()`` hands out streams round-robin from a pool of 32 per
  device and priority, and `torch.cuda.graph` without ``stream=`` captures on one process-wide stream
  created on whatever device was current. So after ~32 stream creations a producer could be handed
  the very stream being captured (its kernels would join the capture), and an embedder on a second
  GPU would capture on the first. Each `GraphCache` therefore creates a dedicated, non-blocking stream
  on its own device with CuPy or NVIDIA's cuda-python (both on the GPU machines), and only falls back
  to a pool stream, with a warning, where neither is importable.
- **One capture at a time in the process** (`CAPTURE_LOCK`), with ``capture_error_mode=
  "thread_local"`` so other threads may keep copying and replaying while one captures.
- **Failures are retried, not remembered forever**: `CapturePolicy` retries a bucket whose capture
  failed after more uses (doubling each time, up to ``max_failures``), and forgets failures when the
  graphs are dropped (a fresh memory pool).
- **No capture under memory pressure**: the caller's ``blocked()`` (governor throttling or holding
  after an OOM) keeps buckets eager; an OOM during capture is re-raised for the OOM splitter.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable, Optional

import torch

from hades_gpu.gpu.oom import is_cuda_oom

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (rows, length) of a captured shape
Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Process-wide: a capture synchronizes the device and swaps the allocator into capture mode; two at
# once (two embedders, two devices) are serialised here.
CAPTURE_LOCK = threading.Lock()


class CapturePolicy:
    """Answers "capture this bucket now?" (STYLE item 3: a policy is a small class answering yes/no).

    Args:
        graph_after (int, optional): a bucket is captured on its n-th use, so one-off shapes stay
            eager (default: 2).
        max_graphs (int, optional): at most this many captured buckets (default: 128).
        retry_after (int, optional): uses after a failed capture before the first retry; doubles with
            each further failure (default: 16).
        max_failures (int, optional): a bucket that failed this often stays eager until `reset`
            (default: 3).
    """

    def __init__(self, graph_after: int = 2, max_graphs: int = 128, retry_after: int = 16,
                 max_failures: int = 3) -> None:
        if graph_after < 1 or max_graphs < 0 or retry_after < 1 or max_failures < 1:
            raise ValueError(f"graph_after, retry_after, max_failures must be >= 1 and max_graphs >= 0 "
                             f"(got {graph_after}, {retry_after}, {max_failures}, {max_graphs})")
        self.graph_after = graph_after
        self.max_graphs = max_graphs
        self.retry_after = retry_after
        self.max_failures = max_failures
        self.uses: Counter[Bucket] = Counter()
        self._failures: dict[Bucket, tuple[int, int]] = {}  # bucket -> (failures, retry at use count)

    def note_use(self, key: Bucket) -> None:
        self.uses[key] += 1

    def should_capture(self, key: Bucket, captured: int, blocked: bool) -> bool:
        if blocked or captured >= self.max_graphs or self.uses[key] < self.graph_after:
            return False
        failed = self._failures.get(key)
        if failed is not None:
            failures, retry_at = failed
            return failures < self.max_failures and self.uses[key] >= retry_at
        return True

    def note_failure(self, key: Bucket) -> None:
        failures = self._failures.get(key, (0, 0))[0] + 1
        self._failures[key] = (failures, self.uses[key] + self.retry_after * 2 ** (failures - 1))

    def note_success(self, key: Bucket) -> None:
        self._failures.pop(key, None)

    def reset(self) -> None:
        """Forget failures (the graphs were dropped and a fresh pool starts); use counts stay."""
        self._failures.clear()

    @property
    def failed_buckets(self) -> int:
        return len(self._failures)


class _OwnedStream:
    """A CUDA stream created outside torch's pool, wrapped as a torch stream, destroyed on close."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._keep: Any = None
        self._destroy: Optional[Callable[[], None]] = None
        self.source = ""
        errors = []
        for make in (self._from_cupy, self._from_cuda_python):
            try:
                ptr = make()
                self.stream: torch.cuda.Stream = torch.cuda.ExternalStream(ptr, device=device)
                return
            except Exception as err:  # missing package or a driver refusal: try the next way
                errors.append(f"{make.__name__[6:]}: {type(err).__name__}: {err}")
        self.stream = torch.cuda.Stream(device=device)
        self.source = "torch pool (shared)"
        log.warning("CUDA graph capture on a pooled torch stream (cupy and cuda-python unavailable: %s); "
                    "another stream user may collide with it", "; ".join(errors))

    def _from_cupy(self) -> int:
        import cupy

        with cupy.cuda.Device(self.device.index):
            s = cupy.cuda.Stream(non_blocking=True)
        self._keep, self.source = s, "cupy"  # cupy destroys the stream when `s` is collected
        return int(s.ptr)

    def _from_cuda_python(self) -> int:
        from cuda.bindings import runtime as cudart

        with torch.cuda.device(self.device):  # the primary context of this device is current
            (err,) = cudart.cudaSetDevice(self.device.index)
            if err != cudart.cudaError_t.cudaSuccess:
                raise RuntimeError(f"cudaSetDevice({self.device.index}) returned {err}")
            err, handle = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
            if err != cudart.cudaError_t.cudaSuccess:
                raise RuntimeError(f"cudaStreamCreateWithFlags returned {err}")
        self._keep, self.source = handle, "cuda-python"
        self._destroy = lambda: cudart.cudaStreamDestroy(handle)
        return int(handle)

    def close(self) -> None:
        if self._destroy is not None:
            self.stream.synchronize()
            self._destroy()
            self._destroy = None
        self._keep = None


class _Graph:
    """One captured bucket and its static tensors."""

    __slots__ = ("graph", "ids", "mask", "out")

    def __init__(self, graph: Any, ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
        self.graph, self.ids, self.mask, self.out = graph, ids, mask, out


class GraphCache:
    """CUDA graphs of ``fn(ids, mask) -> (rows, dim)`` per bucket, replayed on the caller's stream.

    Args:
        fn (callable): int64 (Bp, Lp) ids and mask on `device` -> float32 (Bp, dim); must be
            capturable (no host syncs) and give row i from input row i only.
        device (torch.device): a CUDA device.
        policy (CapturePolicy): when to capture.
        blocked (callable, optional): ``() -> bool``, True while capture must wait (memory pressure).

    `run` holds a lock from copy-in to copy-out: a bucket's static tensors serve one batch at a time,
    and graphs in the shared pool may reuse each other's memory, so replays never overlap.
    """

    def __init__(self, fn: Fn, device: torch.device, policy: CapturePolicy,
                 blocked: Callable[[], bool] = lambda: False) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device (got {device})")
        self.fn = fn
        self.device = device
        self.policy = policy
        self.blocked = blocked
        self._owned = _OwnedStream(device)
        self.capture_stream = self._owned.stream
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()
        self._graphs: dict[Bucket, _Graph] = {}
        self.captures = 0
        self.capture_failures = 0
        self.replays = 0
        self.dropped = 0

    @property
    def stream_source(self) -> str:
        return self._owned.source

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Bucket, ids: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
        """Replay `key`'s graph on the current stream for (B, L) inputs with B <= rows, L <= length;
        a fresh (B, dim) tensor, or None when this bucket runs eagerly (not captured, or capture
        failed). A CUDA OOM during capture propagates."""
        rows, length = ids.shape
        with self._lock:
            self.policy.note_use(key)
            graph = self._graphs.get(key)
            if graph is None and self.policy.should_capture(key, len(self._graphs), self.blocked()):
                graph = self._capture(key)
            if graph is None:
                return None
            # refill the static inputs; pad rows attend to column 0 only (no all-masked softmax)
            graph.ids.zero_()
            graph.mask.zero_()
            graph.mask[rows:, 0] = 1
            graph.ids[:rows, :length].copy_(ids)
            graph.mask[:rows, :length].copy_(mask)
            graph.graph.replay()
            self.replays += 1
            # copy out now, on this stream: another bucket's replay may reuse the pool's memory
            return graph.out[:rows].clone()

    def _capture(self, key: Bucket) -> Optional[_Graph]:
        caller = torch.cuda.current_stream(self.device)
        stream = self.capture_stream
        with CAPTURE_LOCK, torch.cuda.device(self.device):
            try:
                stream.wait_stream(caller)
                with torch.cuda.stream(stream):
                    ids = torch.zeros(key, dtype=torch.int64, device=self.device)  # (Bp, Lp) static input
                    mask = torch.zeros(key, dtype=torch.int64, device=self.device)
                    mask[:, 0] = 1
                    self.fn(ids, mask)  # warm-up at the exact shape: cuBLAS workspaces, SDPA kernels
                graph = torch.cuda.CUDAGraph()
                # (torch.cuda.graph synchronizes the device on entry: a capture costs a few ms, once.)
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    out = self.fn(ids, mask)  # (Bp, dim) static output, in the shared pool
            except Exception as err:
                if is_cuda_oom(err):
                    raise  # the OOM splitter retries a smaller batch
                self.policy.note_failure(key)
                self.capture_failures += 1
                log.warning("CUDA graph capture failed for bucket %s (%s: %s); it runs eagerly for now",
                            key, type(err).__name__, err)
                return None
            caller.wait_stream(stream)  # replays on the caller's stream see the static inputs' fill
        self.policy.note_success(key)
        self.captures += 1
        g = _Graph(graph, ids, mask, out)
        self._graphs[key] = g
        log.debug("captured CUDA graph for bucket (rows=%d, length=%d) on %s", key[0], key[1], self.device)
        return g

    def drop(self) -> int:
        """Drop every graph (their pool goes back to the allocator); returns how many."""
        with self._lock:
            dropped = len(self._graphs)
            if dropped:
                # SYNC POINT (rare: memory pressure): replays in flight finish before the pool is freed
                torch.cuda.synchronize(self.device)
                self._graphs.clear()
                self._pool = torch.cuda.graph_pool_handle()  # later captures start a fresh pool
            self.policy.reset()
            self.dropped += dropped
            return dropped

    def close(self) -> None:
        self.drop()
        self._owned.close()

    def metrics(self) -> dict[str, Any]:
        return {"graphs_captured": len(self._graphs), "captures": self.captures,
                "graph_capture_failures": self.capture_failures, "graph_replays": self.replays,
                "graphs_dropped": self.dropped, "capture_stream": self.stream_source,
                "buckets_seen": len(self.policy.uses)}
