"""Fixed-size shared-memory slabs: one packed model batch each, written by a worker process.

The main process owns the ring: one anonymous shared mapping (`os.memfd_create`, so nothing is left
behind in /dev/shm when a process is killed) cut into `count` slabs of the same layout. Worker
processes map the same memory through the file descriptor they inherit and write a batch's token
ids, attention mask and its rows' columns (document key, ordinal, offsets, token counts, chunk ids,
UTF-8 texts) straight into the slab the main process granted them. The main process then hands the
slab's views to the embedder and the writer: no per-chunk Python object crosses a process boundary.

Where CUDA exists the whole mapping is registered as page-locked memory once
(``cudaHostRegister``), so host-to-device copies run asynchronously straight from a slab. A slab
returns to the free list only after the embedder's call returned (its copies are complete: every
embedder synchronises before it returns vectors) and the writer copied the rows out.

Why hand-written: `multiprocessing.shared_memory` registers every attach with a resource tracker
that unlinks or warns about the segment when a worker exits (Python < 3.13), and names a file that
outlives a killed parent; a memfd has neither problem.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hades_gpu.gpu.host_ring import FreeSlots

log = logging.getLogger(__name__)

CHUNK_ID_BYTES = 16  # records.stable_id: 16 hex characters
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class SlabLayout:
    """Byte offsets of one slab's columns; identical in every process (it is pickled to workers).

    Args:
        max_rows (int): most sequences per batch (the profile's `max_batch_size`).
        max_len (int): longest padded sequence (the model's `max_seq_len`).
        text_bytes (int): room for the rows' UTF-8 texts; a batch whose texts do not fit sends
            them with its header instead (rare: chunks of mostly whitespace or dropped characters).
        vector_dim (int): room for the batch's float32 vectors of this width (0: none). The main
            process writes them there when the writer is a process of its own, which then reads the
            whole batch from the slab (`orchestration.writer_process`).
    """

    max_rows: int
    max_len: int
    text_bytes: int
    vector_dim: int = 0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_len < 1 or self.text_bytes < 0 or self.vector_dim < 0:
            raise ValueError(f"slab layout needs max_rows, max_len >= 1 and text_bytes, vector_dim >= 0 (got {self})")

    @property
    def _fields(self) -> list[tuple[str, np.dtype, int]]:
        r, tokens = self.max_rows, self.max_rows * self.max_len
        return [("input_ids", np.dtype(np.int64), tokens), ("attention_mask", np.dtype(np.int64), tokens),
                ("doc_key", np.dtype(np.int64), r), ("ordinal", np.dtype(np.int32), r),
                ("char_start", np.dtype(np.int64), r), ("char_end", np.dtype(np.int64), r),
                ("n_tokens", np.dtype(np.int32), r), ("chunk_id", np.dtype(np.uint8), r * CHUNK_ID_BYTES),
                ("text_offsets", np.dtype(np.int32), r + 1), ("vectors", np.dtype(np.float32), r * self.vector_dim),
                ("text", np.dtype(np.uint8), self.text_bytes)]

    @property
    def offsets(self) -> dict[str, tuple[int, np.dtype, int]]:
        """name -> (byte offset in the slab, dtype, element count)."""
        out, pos = {}, 0
        for name, dtype, count in self._fields:
            out[name] = (pos, dtype, count)
            pos = _aligned(pos + dtype.itemsize * count)
        return out

    @property
    def nbytes(self) -> int:
        last = self._fields[-1]
        off = self.offsets[last[0]][0]
        return _aligned(off + last[1].itemsize * last[2])


class SlabView:
    """Numpy views of one slab's columns (valid while the mapping is open)."""

    def __init__(self, buf: memoryview, layout: SlabLayout) -> None:
        self.layout = layout
        self._cols: dict[str, np.ndarray] = {}
        for name, (off, dtype, count) in layout.offsets.items():
            self._cols[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=off)

    def tokens(self, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous (rows, length) input ids and attention mask."""
        if rows > self.layout.max_rows or length > self.layout.max_len:
            raise ValueError(f"batch ({rows}, {length}) exceeds the slab ({self.layout.max_rows}, {self.layout.max_len})")
        size = rows * length
        return (self._cols["input_ids"][:size].reshape(rows, length),
                self._cols["attention_mask"][:size].reshape(rows, length))

    def column(self, name: str) -> np.ndarray:
        return self._cols[name]

    def vectors(self, rows: int) -> np.ndarray:
        """(rows, vector_dim) float32 view of the vectors area."""
        dim = self.layout.vector_dim
        return self._cols["vectors"][: rows * dim].reshape(rows, dim)

    def chunk_ids(self, rows: int) -> np.ndarray:
        """(rows, 16) uint8 view of the chunk-id bytes."""
        return self._cols["chunk_id"][: rows * CHUNK_ID_BYTES].reshape(rows, CHUNK_ID_BYTES)


class SlabMapping:
    """`count` slabs of `layout` in one shared mapping of a file descriptor (both sides use this)."""

    def __init__(self, fd: int, layout: SlabLayout, count: int) -> None:
        self.fd = fd
        self.layout = layout
        self.count = count
        self.slab_bytes = layout.nbytes
        self.nbytes = self.slab_bytes * count
        self._mmap = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = memoryview(self._mmap)
        self.views = [SlabView(self._buf[i * self.slab_bytes:(i + 1) * self.slab_bytes], layout) for i in range(count)]

    @property
    def address(self) -> int:
        """Address of the mapping in this process (for cudaHostRegister)."""
        return int(np.frombuffer(self._buf, dtype=np.uint8, count=1).__array_interface__["data"][0])

    def close(self) -> None:
        self.views = []
        try:
            self._buf.release()
            self._mmap.close()
        except (BufferError, ValueError):  # a view is still alive somewhere: the OS frees it at exit
            pass


def copies_to_cuda(embedder: object) -> bool:
    """Whether the slabs should be page-locked for `embedder`: only one that copies them to a CUDA
    device (``embedder.cuda`` true, as `CudaEmbedder` on a GPU). Asking torch instead pinned the
    ring, and created a CUDA context, for every CPU or Triton embedder in a process that had
    imported torch for something else."""
    return bool(getattr(embedder, "cuda", False))


def _register_pinned(mapping: SlabMapping) -> bool:
    """Page-lock the mapping for asynchronous copies (CUDA only); False when not possible.

    Only a process that already imported torch can copy from the slabs to a GPU (the CUDA embedder
    imports it when it is built, before the ring): where torch is not loaded the slabs stay plain.
    Importing torch just to ask would cost ~2 s of CPU and ~0.5 GiB in every CPU-only or Triton run."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        if not torch.cuda.is_available():
            return False
        err = torch.cuda.cudart().cudaHostRegister(mapping.address, mapping.nbytes, 0)
        code = int(getattr(err, "value", err))
        if code != 0:
            log.warning("cudaHostRegister of %d MiB of slabs failed (error %d): copies from them will be staged",
                        mapping.nbytes >> 20, code)
            return False
        return True
    except Exception as err:  # noqa: BLE001 - a broken driver must not stop a CPU-capable run
        log.warning("could not page-lock the slabs (%s): copies from them will be staged", err)
        return False


def _unregister_pinned(mapping: SlabMapping) -> None:
    try:
        import torch

        torch.cuda.cudart().cudaHostUnregister(mapping.address)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass


class SlabRing:
    """The main process's ring: the shared mapping, the free list and who holds which slab.

    Args:
        count (int): slabs (bounds the batches in flight: workers' grants, embed and write queues).
        layout (SlabLayout): every slab's columns.
        pin (bool, optional): page-lock the mapping where CUDA exists. (default: True)
    """

    def __init__(self, count: int, layout: SlabLayout, pin: bool = True) -> None:
        if count < 1:
            raise ValueError(f"a slab ring needs at least one slab (got {count})")
        self.layout = layout
        self.count = count
        self.fd = os.memfd_create("hades-slabs", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, layout.nbytes * count)
        self.mapping = SlabMapping(self.fd, layout, count)
        self.pinned = bool(pin and _register_pinned(self.mapping))
        self._slots = FreeSlots(count)
        # a byte on this socket wakes a thread that waits on worker pipes when a slab comes back
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False

    @property
    def nbytes(self) -> int:
        return self.mapping.nbytes

    def view(self, slab: int) -> SlabView:
        return self.mapping.views[slab]

    def try_acquire(self) -> Optional[int]:
        return self._slots.try_acquire()

    def acquire(self, timeout: Optional[float] = None) -> Optional[int]:
        """A free slab, waiting up to `timeout` seconds; None on timeout."""
        return self._slots.acquire(timeout)

    @property
    def acquired(self) -> int:
        return self._slots.acquired

    @property
    def waits(self) -> int:
        return self._slots.waits

    def release(self, slab: int) -> None:
        """Return a slab (its batch was embedded and its rows copied out)."""
        self._slots.release(slab)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # the waker is already full of wake-ups, or closed
            pass

    @property
    def free(self) -> int:
        return self._slots.free

    def wake_socket(self) -> socket.socket:
        """Readable when a slab was released (drain it with `drain_wakeups`)."""
        return self._wake_r

    def drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pinned:
            _unregister_pinned(self.mapping)
        self.mapping.close()
        os.close(self.fd)
        self._wake_r.close()
        self._wake_w.close()


__all__ = ["CHUNK_ID_BYTES", "SlabLayout", "SlabView", "SlabMapping", "SlabRing", "copies_to_cuda"]
