"""Overlap host<->device copies with compute on CUDA streams.

One batch goes through three CUDA streams, ordered by events (no host waits in between):

```
 copy stream    H2D ids/mask (pinned -> device) ── h2d_done ─┐
 compute stream                         wait(h2d_done) ── compute(ids, mask) -> out ── computed ─┐
 d2h stream                                                      wait(computed) ── D2H out -> pinned ── done
 host thread   submit() returns at once ......................................... result(): done.synchronize()
```

`submit` only enqueues work, so while batch i computes the host already enqueues batch i+1's
host-to-device copy on the copy stream (`map` keeps `depth` batches in flight; several threads
calling `run` overlap the same way). Results are copied into pinned host buffers on their own stream,
so the compute stream never waits for a device-to-host copy. Tensor lifetimes across streams are
declared with `Tensor.record_stream`: the caching allocator will not hand a block allocated on one
stream to new work until the other stream has finished with it.

Host buffers: inputs that already live in pinned memory (the pipeline's `HostBufferRing`) are copied
straight from there; other inputs are first staged into a pinned ring slot. Outputs land in a small
pool of pinned float32 buffers and are copied out to an ordinary array once the batch is done.

On the CPU (or with ``side_streams=False``) `submit` runs the batch synchronously: same function,
same results, no streams. ``side_streams=False`` on CUDA is the benchmark's "synchronous copies"
baseline: blocking copies on the compute stream, and a blocking copy back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from hades_gpu.gpu.host_ring import HostBufferRing

Compute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _PinnedPool:
    """A fixed set of pinned float32 (max_rows, dim) buffers, handed out and returned."""

    def __init__(self, slots: int, max_rows: int, dim: int, pin: bool) -> None:
        self._buffers = [torch.empty((max_rows, dim), dtype=torch.float32, pin_memory=pin) for _ in range(slots)]
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self.max_rows = max_rows

    def acquire(self, timeout: float) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                raise RuntimeError(f"no pinned output buffer freed within {timeout:.0f} s "
                                   f"({len(self._buffers)} in use): a submitted batch's result() was never read")
            return self._free.pop()

    def buffer(self, slot: int) -> torch.Tensor:
        return self._buffers[slot]

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


class Pending:
    """A submitted batch; `result()` waits for it (the only point where the host waits for the GPU)."""

    __slots__ = ("_owner", "_rows", "_done", "_out_slot", "_stage_slot", "_value")

    def __init__(self, owner: "StreamProducer", rows: int, value: Optional[np.ndarray] = None) -> None:
        self._owner = owner
        self._rows = rows
        self._value = value
        self._done: Optional[torch.cuda.Event] = None
        self._out_slot = -1
        self._stage_slot = -1

    def ready(self) -> bool:
        return self._value is not None or (self._done is not None and self._done.query())

    def result(self) -> np.ndarray:
        """float32 (rows, dim), an array the caller owns."""
        if self._value is None:
            assert self._done is not None
            # SYNC POINT: this thread (not the compute stream) waits for its batch's D2H copy.
            self._done.synchronize()
            out = self._owner._out_pool.buffer(self._out_slot)  # type: ignore[union-attr]
            self._value = out[: self._rows].numpy().copy()  # (rows, dim), out of the pinned buffer
            self._owner._finish(self)
        return self._value


class StreamProducer:
    """Run `compute` on batches with side-stream copies (CUDA) or synchronously (CPU).

    Args:
        device (torch.device): where `compute` runs.
        compute (callable): ``(ids, mask) -> out``: int64 (B, L) device tensors to a float32
            (B, dim) device tensor. Called on the compute stream; it must return a tensor it will not
            overwrite later (e.g. a clone of a CUDA graph's static output).
        out_dim (int): dim of the output rows.
        max_rows (int): rows of the pinned staging/output buffers; larger batches still run, through
            an unpinned (synchronous) path.
        max_len (int): sequence length of the pinned input staging buffers.
        side_streams (bool, optional): copy on side streams (default: True). False: synchronous copies.
        slots (int, optional): pinned buffers, i.e. batches in flight at most (default: 4).
        compute_stream (torch.cuda.Stream, optional): default: a new stream on `device`.
    """

    def __init__(self, device: torch.device, compute: Compute, out_dim: int, max_rows: int, max_len: int,
                 side_streams: bool = True, slots: int = 4,
                 compute_stream: Optional["torch.cuda.Stream"] = None, buffer_timeout_s: float = 300.0) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        self.device = torch.device(device)
        self.compute = compute
        self.out_dim = int(out_dim)
        self.cuda = self.device.type == "cuda"
        self.side_streams = bool(side_streams and self.cuda)
        self.buffer_timeout_s = buffer_timeout_s
        self.batches = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.staged_inputs = 0  # inputs that were not pinned and went through a staging slot
        self.unpinned_batches = 0  # too big for the pinned buffers: synchronous copies
        self._stats_lock = threading.Lock()
        if self.cuda:
            self.compute_stream = compute_stream or torch.cuda.Stream(device=self.device)
        else:
            self.compute_stream = None
        if self.side_streams:
            self.copy_stream = torch.cuda.Stream(device=self.device)  # host -> device
            self.d2h_stream = torch.cuda.Stream(device=self.device)  # device -> host
            # pinned once, reused for every batch (never pinned per batch)
            self._stage = HostBufferRing(slots, max_rows, max_len, pin=True)
            self._out_pool: Optional[_PinnedPool] = _PinnedPool(slots, max_rows, self.out_dim, pin=True)
        else:
            self._out_pool = None

    # -- submission --------------------------------------------------------------------------

    def submit(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Pending:
        """Enqueue one batch; returns at once on CUDA with side streams, after the work otherwise.

        Shapes:
            input_ids, attention_mask: int64 (B, L) -> Pending.result(): float32 (B, dim)
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        rows, length = ids.shape
        with self._stats_lock:
            self.batches += 1
            self.h2d_bytes += ids.nbytes + mask.nbytes
            self.d2h_bytes += rows * self.out_dim * 4
        if not self.cuda:
            out = self.compute(torch.from_numpy(ids), torch.from_numpy(mask))
            return Pending(self, rows, out.detach().to(torch.float32).numpy().copy())
        assert self._out_pool is not None or not self.side_streams
        if not self.side_streams or rows > self._out_pool.max_rows or length > self._stage.max_len:  # type: ignore[union-attr]
            if self.side_streams:
                with self._stats_lock:
                    self.unpinned_batches += 1
            return Pending(self, rows, self._run_sync(ids, mask))
        return self._submit_async(ids, mask)

    def _run_sync(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Synchronous copies on the compute stream (the baseline, and the oversize fallback)."""
        assert self.compute_stream is not None
        with torch.cuda.stream(self.compute_stream):
            ids_d = torch.from_numpy(ids).to(self.device)  # blocking H2D
            mask_d = torch.from_numpy(mask).to(self.device)
            out = self.compute(ids_d, mask_d)  # (B, dim) float32
            return out.to("cpu").numpy().copy()  # SYNC POINT: blocking D2H, the host waits for compute

    def _submit_async(self, ids: np.ndarray, mask: np.ndarray) -> Pending:
        rows, length = ids.shape
        pending = Pending(self, rows)
        host_ids, host_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        if not (host_ids.is_pinned() and host_mask.is_pinned()):
            slot = self._stage.acquire(timeout=self.buffer_timeout_s)
            if slot is None:
                raise RuntimeError(f"no pinned staging buffer freed within {self.buffer_timeout_s:.0f} s")
            pending._stage_slot = slot
            stage_ids, stage_mask = self._stage.views(slot, rows, length)
            np.copyto(stage_ids, ids)
            np.copyto(stage_mask, mask)
            host_ids, host_mask = torch.from_numpy(stage_ids), torch.from_numpy(stage_mask)
            with self._stats_lock:
                self.staged_inputs += 1
        try:
            pending._out_slot = self._out_pool.acquire(self.buffer_timeout_s)  # type: ignore[union-attr]
        except BaseException:
            self._finish(pending)
            raise
        assert self.compute_stream is not None

        h2d_done: Optional[torch.cuda.Event] = None
        try:
            # 1) host -> device on the copy stream; the compute stream may still be busy with batch i-1.
            with torch.cuda.stream(self.copy_stream):
                ids_d = torch.empty((rows, length), dtype=torch.int64, device=self.device)
                mask_d = torch.empty((rows, length), dtype=torch.int64, device=self.device)
                ids_d.copy_(host_ids, non_blocking=True)  # (B, L)
                mask_d.copy_(host_mask, non_blocking=True)  # (B, L)
                h2d_done = torch.cuda.Event()
                h2d_done.record(self.copy_stream)
            # allocated on the copy stream, read on the compute stream
            ids_d.record_stream(self.compute_stream)
            mask_d.record_stream(self.compute_stream)

            # 2) compute once the copy has landed (a device-side wait: the host does not block).
            self.compute_stream.wait_event(h2d_done)
            with torch.cuda.stream(self.compute_stream):
                out = self.compute(ids_d, mask_d)  # (B, dim) float32, allocated on the compute stream
                computed = torch.cuda.Event()
                computed.record(self.compute_stream)
        except BaseException:
            # e.g. CUDA OOM in compute (the caller splits and retries): give the buffers back, but
            # only once the DMA engine has finished reading the staging slot.
            if h2d_done is not None:
                h2d_done.synchronize()
            self._finish(pending)
            raise

        # 3) device -> pinned host on the d2h stream, so the compute stream goes straight on.
        out_host = self._out_pool.buffer(pending._out_slot)[:rows]  # type: ignore[union-attr]
        self.d2h_stream.wait_event(computed)
        with torch.cuda.stream(self.d2h_stream):
            out_host.copy_(out, non_blocking=True)
            # blocking=True: a host thread waiting on it sleeps instead of spinning a core that the
            # tokenizer workers need.
            done = torch.cuda.Event(blocking=True)
            done.record(self.d2h_stream)
        out.record_stream(self.d2h_stream)  # allocated on compute, read by the d2h stream
        pending._done = done
        return pending

    def _finish(self, pending: Pending) -> None:
        if pending._out_slot >= 0 and self._out_pool is not None:
            self._out_pool.release(pending._out_slot)
            pending._out_slot = -1
        if pending._stage_slot >= 0:
            self._stage.release(pending._stage_slot)
            pending._stage_slot = -1

    # -- convenience -------------------------------------------------------------------------

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One batch, start to finish. Several threads calling it at once overlap on CUDA."""
        return self.submit(input_ids, attention_mask).result()

    def map(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], depth: int = 2) -> Iterator[np.ndarray]:
        """Results in order, keeping up to `depth` batches in flight: batch i+1 is copied to the device
        (and its compute enqueued) before the host waits for batch i."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (got {depth})")
        inflight: deque[Pending] = deque()
        try:
            for ids, mask in batches:
                inflight.append(self.submit(ids, mask))  # prefetch: enqueue the next batch first
                if len(inflight) >= depth:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        finally:
            for pending in inflight:  # a consumer that stopped early: let the buffers go back
                pending.result()

    def synchronize(self) -> None:
        """Wait for every stream of this producer (benchmarks time around it)."""
        if self.cuda:
            for stream in (self.compute_stream, getattr(self, "copy_stream", None), getattr(self, "d2h_stream", None)):
                if stream is not None:
                    stream.synchronize()

    def metrics(self) -> dict[str, object]:
        with self._stats_lock:
            return {
                "side_streams": self.side_streams,
                "batches": self.batches,
                "h2d_bytes": self.h2d_bytes,
                "d2h_bytes": self.d2h_bytes,
                "staged_inputs": self.staged_inputs,
                "unpinned_batches": self.unpinned_batches,
            }

    def close(self) -> None:
        self.synchronize()


def timed_map(producer: StreamProducer, batches: list[tuple[np.ndarray, np.ndarray]], depth: int = 2) -> tuple[list[np.ndarray], float]:
    """Run `batches` through `producer.map`, synchronized before and after; (results, seconds)."""
    producer.synchronize()
    start = time.perf_counter()
    out = list(producer.map(batches, depth=depth))
    producer.synchronize()
    return out, time.perf_counter() - start
