"""A queue bounded by bytes and by items, with hysteresis backpressure.

Producers block (with exponential backoff) once the queued bytes pass the high watermark and resume
only when consumers have drained them below the low watermark, so a slow stage caps the memory of
every stage before it. Every wait is counted. `close()` lets consumers drain what is left;
`abort(err)` wakes every blocked thread at once with that error, so a failure anywhere stops the
pipeline instead of hanging it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, Generic, Optional, TypeVar

from hades_gpu.config import check_watermarks

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed and is empty: the producer side is finished."""


class PipelineAborted(RuntimeError):
    """Another stage failed; the original error is the `__cause__`."""


def _default_size(item: object) -> int:
    return int(getattr(item, "nbytes", 0))


@dataclass
class QueueStats:
    """Counters a monitor reads; all totals since construction."""

    name: str
    items: int
    bytes: int
    peak_items: int
    peak_bytes: int
    puts: int
    gets: int
    put_waits: int  # how many puts had to wait (backpressure events)
    put_wait_s: float  # total time producers spent blocked
    get_wait_s: float  # total time consumers spent waiting for input
    max_bytes: int
    max_items: int


class MemoryAwareQueue(Generic[T]):
    """FIFO bounded by `max_bytes` and `max_items`, with high/low watermarks on the bytes.

    Args:
        name (str): stage name for metrics and errors.
        max_bytes (int): byte budget; producers stop at `high_watermark * max_bytes`.
        max_items (int): hard cap on queued items.
        high_watermark (float): fraction of `max_bytes` at which producers start waiting.
        low_watermark (float): fraction below which waiting producers resume (0 < low < high <= 1).
        backoff_initial_s (float): first wait of a blocked producer; doubles up to `backoff_max_s`.
        backoff_max_s (float): longest single wait between re-checks.
        size_of (callable, optional): bytes of an item (default: its `nbytes` attribute).

    An item larger than the whole budget is still admitted when the queue is empty, so one huge
    document slows the pipeline down but never deadlocks it.
    """

    def __init__(
        self,
        name: str,
        max_bytes: int,
        max_items: int,
        high_watermark: float = 0.9,
        low_watermark: float = 0.6,
        backoff_initial_s: float = 0.001,
        backoff_max_s: float = 0.05,
        size_of: Callable[[T], int] = _default_size,
    ) -> None:
        check_watermarks(low_watermark, high_watermark, f"queue {name!r} low/high watermark")
        if max_bytes < 1 or max_items < 1:
            raise ValueError(f"max_bytes and max_items must be >= 1 (got {max_bytes}, {max_items})")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(f"backoff must satisfy 0 < initial <= max (got {backoff_initial_s}, {backoff_max_s})")
        self.name = name
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._high = int(high_watermark * max_bytes)
        self._low = int(low_watermark * max_bytes)
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._size_of = size_of
        self._items: Deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._throttled = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._peak_items = 0
        self._peak_bytes = 0
        self._puts = 0
        self._gets = 0
        self._put_waits = 0
        self._put_wait_s = 0.0
        self._get_wait_s = 0.0

    # -- producer side -------------------------------------------------------------------------
    def _can_admit(self, size: int) -> bool:
        if not self._items:
            return True
        if len(self._items) >= self.max_items:
            return False
        if self._throttled:
            if self._bytes > self._low:
                return False
            self._throttled = False
        if self._bytes + size > self._high:
            self._throttled = True
            return False
        return True

    def put(self, item: T, timeout: Optional[float] = None) -> bool:
        """Enqueue, blocking under backpressure. Returns False on timeout; raises if closed/aborted."""
        size = self._size_of(item)
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = self._backoff_initial
        waited_from: Optional[float] = None
        with self._cond:
            while True:
                self._raise_if_aborted()
                if self._closed:
                    raise QueueClosed(f"queue {self.name!r} is closed")
                if self._can_admit(size):
                    break
                if waited_from is None:
                    waited_from = time.monotonic()
                    self._put_waits += 1
                wait = backoff
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._put_wait_s += time.monotonic() - waited_from
                        return False
                    wait = min(wait, remaining)
                self._cond.wait(wait)
                backoff = min(backoff * 2, self._backoff_max)
            if waited_from is not None:
                self._put_wait_s += time.monotonic() - waited_from
            self._items.append((item, size))
            self._bytes += size
            self._puts += 1
            self._peak_items = max(self._peak_items, len(self._items))
            self._peak_bytes = max(self._peak_bytes, self._bytes)
            self._cond.notify_all()
            return True

    # -- consumer side -------------------------------------------------------------------------
    def get(self, timeout: Optional[float] = None) -> T:
        """Dequeue the oldest item. Raises QueueClosed when closed and drained, TimeoutError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        start = time.monotonic()
        with self._cond:
            while not self._items:
                self._raise_if_aborted()
                if self._closed:
                    raise QueueClosed(f"queue {self.name!r} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._get_wait_s += time.monotonic() - start
                    raise TimeoutError(f"queue {self.name!r}: no item within {timeout}s")
                self._cond.wait(remaining if remaining is not None else 0.1)
            self._raise_if_aborted()
            item, size = self._items.popleft()
            self._bytes -= size
            self._gets += 1
            self._get_wait_s += time.monotonic() - start
            self._cond.notify_all()
            return item

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """No more puts; consumers drain what is queued, then get QueueClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        """Wake every waiter with `PipelineAborted` from `error`; queued items are dropped."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    def _raise_if_aborted(self) -> None:
        if self._error is not None:
            raise PipelineAborted(f"queue {self.name!r} aborted: {self._error}") from self._error

    # -- observation -----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def stats(self) -> QueueStats:
        with self._cond:
            return QueueStats(
                name=self.name,
                items=len(self._items),
                bytes=self._bytes,
                peak_items=self._peak_items,
                peak_bytes=self._peak_bytes,
                puts=self._puts,
                gets=self._gets,
                put_waits=self._put_waits,
                put_wait_s=self._put_wait_s,
                get_wait_s=self._get_wait_s,
                max_bytes=self.max_bytes,
                max_items=self.max_items,
            )
