"""Which document each worker process is reading: one shared 64-bit word per worker slot.

A worker that dies while reading a document (a segfault in a native parser, the OOM killer) must be
charged with that document and no other (`workers.WorkerPool` retries it once, then skips it as
``worker_crashed``). The worker used to say so with a message before every document: one socket
write and one wake-up of the main process's router per document, on a corpus of 1 KB files about
half of all the messages a worker sent. Now it stores the document's key here (a plain memory
write) and the main process reads the word only after the worker died. Its reports then travel a
few documents to a message (`worker_main`).

A `memfd_create` mapping, like the slab ring (`gpu.slabs`): passed to each worker as an inherited
descriptor, freed with the last process that maps it.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

import numpy as np

NOT_READING = -1
_WORD = np.dtype(np.int64)


class ReadingBoard:
    """`slots` words, one per worker slot (a restarted worker takes its predecessor's slot).

    Args:
        slots (int): worker slots.
        fd (int, optional): an existing board's descriptor (a worker maps its parent's board);
            default: make a new board, every slot `NOT_READING`.
    """

    def __init__(self, slots: int, fd: Optional[int] = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        self.slots = slots
        self.owner = fd is None
        if fd is None:
            fd = os.memfd_create("hades-reading", os.MFD_CLOEXEC)
            os.ftruncate(fd, slots * _WORD.itemsize)
        self.fd = fd
        self._mmap = mmap.mmap(fd, slots * _WORD.itemsize, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = np.frombuffer(self._mmap, dtype=_WORD, count=slots)
        if self.owner:
            self._words[:] = NOT_READING

    def mark(self, slot: int, key: int) -> None:
        """The worker in `slot` begins reading the document of task `key`."""
        self._words[slot] = key

    def reading(self, slot: int) -> Optional[int]:
        """The key the worker in `slot` last marked (None: none since the slot was cleared)."""
        key = int(self._words[slot])
        return None if key == NOT_READING else key

    def clear(self, slot: int) -> None:
        """A new worker takes the slot: nothing read yet."""
        self._words[slot] = NOT_READING

    def close(self) -> None:
        del self._words
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere: the OS frees it at exit
            pass
        if self.owner:
            os.close(self.fd)


__all__ = ["ReadingBoard", "NOT_READING"]
