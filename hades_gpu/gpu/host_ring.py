"""A ring of host buffers allocated once and reused for every batch.

Pinning (page-locking) memory is expensive, so buffers are pinned once at start-up (where CUDA
exists) and recycled: the batcher `acquire`s a free slot, writes a batch into it, and the embed stage
`release`s it after the device has consumed it. Without CUDA the same ring hands out ordinary numpy
buffers, so the code path is identical on a CPU box.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Optional

import numpy as np


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or a broken driver: plain host memory
        return False


class FreeSlots:
    """The free list of a ring of `count` reusable buffers, shared by `HostBufferRing` and
    `gpu.slabs.SlabRing`. FIFO: the least recently released slot goes out first, so buffers take
    turns and a slot just handed back is the last to be rewritten."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._free: deque[int] = deque(range(count))
        self._cond = threading.Condition()
        self.acquired = 0
        self.waits = 0

    def try_acquire(self) -> Optional[int]:
        with self._cond:
            if not self._free:
                return None
            self.acquired += 1
            return self._free.popleft()

    def acquire(self, timeout: Optional[float] = None) -> Optional[int]:
        """A free slot, waiting up to `timeout` seconds; None on timeout."""
        with self._cond:
            if not self._free:
                self.waits += 1
                if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                    return None
            self.acquired += 1
            return self._free.popleft()

    def release(self, slot: int) -> None:
        with self._cond:
            if not 0 <= slot < self.count or slot in self._free:
                raise ValueError(f"slot {slot} is not in use")
            self._free.append(slot)
            self._cond.notify()

    @property
    def free(self) -> int:
        with self._cond:
            return len(self._free)


class HostBufferRing:
    """`slots` pairs of int64 (max_rows, max_len) buffers for input ids and attention masks.

    Args:
        slots (int): number of reusable buffers; bounds the batches in flight.
        max_rows (int): largest batch size.
        max_len (int): largest (bucketed) sequence length.
        pin (bool, optional): page-lock the buffers when CUDA is available (default: True).
    """

    def __init__(self, slots: int, max_rows: int, max_len: int, pin: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        if max_rows < 1 or max_len < 1:
            raise ValueError(f"max_rows and max_len must be >= 1 (got {max_rows}, {max_len})")
        self.slots = slots
        self.max_rows = max_rows
        self.max_len = max_len
        self.pinned = bool(pin and _cuda_available())
        self._tensors: list[object] = []  # keeps pinned torch storage alive
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        for _ in range(slots):
            self._ids.append(self._alloc())
            self._masks.append(self._alloc())
        self._slots = FreeSlots(slots)  # FIFO: a slot just handed back is the last rewritten

    def _alloc(self) -> np.ndarray:
        if self.pinned:
            import torch

            t = torch.zeros((self.max_rows, self.max_len), dtype=torch.int64).pin_memory()
            self._tensors.append(t)
            return t.numpy()  # shares the pinned storage
        return np.zeros((self.max_rows, self.max_len), dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return 2 * self.slots * self.max_rows * self.max_len * 8

    def acquire(self, timeout: Optional[float] = None) -> Optional[int]:
        """Take a free slot, waiting up to `timeout` seconds; None on timeout."""
        return self._slots.acquire(timeout)

    @property
    def acquire_count(self) -> int:
        return self._slots.acquired

    @property
    def wait_count(self) -> int:
        return self._slots.waits

    def views(self, slot: int, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous (rows, length) views of a slot's id and mask buffers."""
        if rows > self.max_rows or length > self.max_len:
            raise ValueError(f"batch ({rows}, {length}) exceeds ring buffers ({self.max_rows}, {self.max_len})")
        size = rows * length
        ids = self._ids[slot].reshape(-1)[:size].reshape(rows, length)
        mask = self._masks[slot].reshape(-1)[:size].reshape(rows, length)
        return ids, mask

    def buffer_address(self, slot: int) -> int:
        """Address of a slot's id buffer (tests use it to prove reuse)."""
        return int(self._ids[slot].__array_interface__["data"][0])

    def release(self, slot: int) -> None:
        self._slots.release(slot)

    @property
    def free_slots(self) -> int:
        return self._slots.free

