"""NVML memory governor: a small policy that says whether GPU producers should wait, and how big the
next batch may be.

It follows the memory-watermark backpressure policies of Ray Data (STYLE items 3 and 4):

- two thresholds, validated at construction: ``0 < gpu.mem_low < gpu.mem_high <= 1``;
- the device's used/total memory is read at most once per ``gpu.poll_interval_s`` (a cached reading
  answers in between);
- when a probe fails the last good reading is reused; before any good reading exists a failed probe
  reads as a full device. The governor never assumes "no pressure" because it could not look;
- hysteresis: throttling starts when the used fraction rises above ``mem_high`` and stops only when
  it falls below ``mem_low``; one log line at each transition, none in between;
- the batch token budget halves on every fresh reading above ``mem_high`` (never below
  ``gpu.min_batch_tokens``) and doubles back on every fresh reading below ``mem_low`` (never above
  the base the caller asks for).

- a CUDA out-of-memory error (`note_oom`) halves the budget at once and *holds* it for
  ``gpu.oom_hold_s``: no growth, and `holding` tells the embedder not to capture CUDA graphs, so an
  OOM cannot turn into a loop of re-capturing and doubling back (each further OOM restarts the hold).
  The hold works without NVML too.

The memory reader is injectable (``reader() -> (used_bytes, total_bytes)``); by default it is
`gpu.nvml.memory_reader` (the one NVML reader, shared with the Prometheus probe and the benchmarks:
NVML by UUID, or ``cudaMemGetInfo``). ``.source`` says which. Without a GPU the governor is *inactive*: it says so once
(a log line, ``.active is False``, ``.reason``) and every method returns at once without reading.

NVML's "used" counts every process on the device and the memory PyTorch's caching allocator holds but
is not using; callers that wait should release the allocator's cache first (``torch.cuda.empty_cache``)
or the reading may never fall below ``mem_low`` (``wait_for_headroom`` takes a ``relieve`` hook).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hades_gpu.config import GpuConfig, check_watermarks
from hades_gpu.gpu.nvml import Reader, memory_reader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReading:
    """One probe of device memory. ``ok`` is False when it is a stand-in for a failed probe."""

    used: int
    total: int
    at: float  # time.monotonic() of the probe
    ok: bool = True

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total > 0 else 1.0


class MemoryGovernor:
    """Throttle GPU producers on device memory pressure (see the module docstring).

    Args:
        cfg (GpuConfig): ``mem_high``, ``mem_low``, ``poll_interval_s``, ``min_batch_tokens``.
        device_index (int, optional): CUDA device to watch; ``None`` means the work runs on the CPU and
            the governor is inactive (default: 0).
        reader (callable, optional): ``() -> (used_bytes, total_bytes)``; default reads NVML.
        clock (callable, optional): monotonic seconds, for the OOM hold (default: time.monotonic).

    Raises:
        ValueError: ``mem_low``/``mem_high`` out of order or range, or a non-positive interval or floor.

    Thread-safe: producers on several threads may call it at once.
    """

    def __init__(self, cfg: GpuConfig, device_index: Optional[int] = 0, reader: Optional[Reader] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        low, high = float(cfg.mem_low), float(cfg.mem_high)
        check_watermarks(low, high, "gpu.mem_low/mem_high")
        if cfg.poll_interval_s <= 0:
            raise ValueError(f"gpu.poll_interval_s must be > 0 (got {cfg.poll_interval_s})")
        if cfg.min_batch_tokens < 1:
            raise ValueError(f"gpu.min_batch_tokens must be >= 1 (got {cfg.min_batch_tokens})")
        self.mem_low = low
        self.mem_high = high
        self.poll_interval_s = float(cfg.poll_interval_s)
        self.min_batch_tokens = int(cfg.min_batch_tokens)
        if cfg.oom_hold_s < 0:
            raise ValueError(f"gpu.oom_hold_s must be >= 0 (got {cfg.oom_hold_s})")
        self.oom_hold_s = float(cfg.oom_hold_s)
        self.device_index = device_index
        self._clock = clock

        self.active = True
        self.reason = ""
        self.source = "injected reader"
        if reader is None:
            if device_index is None:
                reader, self.reason = None, "no GPU: work runs on the CPU"
            else:
                reader, detail = memory_reader(device_index)
                if reader is None:
                    self.reason = detail
                else:
                    self.source = detail
                    log.info("GPU memory governor on cuda:%d reads %s", device_index, detail)
            if reader is None:
                self.active = False
                self.source = ""
                log.info("NVML memory governor inactive: %s", self.reason)
        self._reader = reader

        self._lock = threading.Lock()
        self._reading: Optional[MemoryReading] = None  # last probe (good or stand-in)
        self._last_good: Optional[MemoryReading] = None
        self._seq = 0  # bumps on every fresh probe; budget steps happen at most once per probe
        self._failing = False
        self._throttling = False
        self._budget: Optional[int] = None
        self._budget_seq = 0
        self._hold_until = float("-inf")  # clock() until which an OOM holds the budget down
        self._oom_halvings = 0  # OOMs seen before any budget was asked for

        # counters (read them through `metrics()` for a consistent snapshot)
        self.throttle_events = 0  # times throttling started
        self.wait_seconds = 0.0  # time producers spent in wait_for_headroom
        self.waits = 0  # wait_for_headroom calls that had to wait
        self.budget_shrinks = 0
        self.budget_grows = 0
        self.probe_failures = 0
        self.probes = 0
        self.max_used_bytes = 0  # highest used memory seen by a good probe
        self.total_bytes = 0
        self.oom_events = 0

    # -- readings ---------------------------------------------------------------------------

    def _probe_locked(self, force: bool = False) -> MemoryReading:
        """Latest reading, probing the device only if the cached one is older than the interval."""
        now = time.monotonic()
        cached = self._reading
        if cached is not None and not force and now - cached.at < self.poll_interval_s:
            return cached
        assert self._reader is not None
        self.probes += 1
        try:
            used, total = self._reader()
            if total <= 0 or used < 0:
                raise ValueError(f"memory reader returned used={used}, total={total}")
            reading = MemoryReading(int(used), int(total), now)
            self._last_good = reading
            self.max_used_bytes = max(self.max_used_bytes, reading.used)
            self.total_bytes = reading.total
            if self._failing:
                self._failing = False
                log.info("GPU memory probe recovered (%.1f%% used)", 100 * reading.fraction)
        except Exception as err:  # the probe's failure must not fail the pipeline
            self.probe_failures += 1
            last = self._last_good
            if not self._failing:
                self._failing = True
                what = (f"reusing the last reading ({100 * last.fraction:.1f}% used)" if last is not None
                        else "no reading yet: treating the device as full")
                log.warning("GPU memory probe failed (%s: %s); %s", type(err).__name__, err, what)
            if last is not None:
                reading = MemoryReading(last.used, last.total, now, ok=False)
            else:  # never "no pressure" by default
                reading = MemoryReading(1, 1, now, ok=False)
        self._reading = reading
        self._seq += 1
        self._update_throttle_locked(reading)
        return reading

    def _update_throttle_locked(self, reading: MemoryReading) -> None:
        frac = reading.fraction
        if not self._throttling and frac > self.mem_high:
            self._throttling = True
            self.throttle_events += 1
            log.warning("GPU memory %.1f%% used > gpu.mem_high %.0f%%: throttling GPU producers",
                        100 * frac, 100 * self.mem_high)
        elif self._throttling and frac < self.mem_low:
            self._throttling = False
            log.info("GPU memory %.1f%% used < gpu.mem_low %.0f%%: throttling stopped", 100 * frac, 100 * self.mem_low)

    def reading(self, force: bool = False) -> Optional[MemoryReading]:
        """The current (cached unless `force`) reading; None when inactive."""
        if not self.active:
            return None
        with self._lock:
            return self._probe_locked(force)

    # -- the policy --------------------------------------------------------------------------

    def should_wait(self) -> bool:
        """True while throttling (above mem_high, until below mem_low)."""
        if not self.active:
            return False
        with self._lock:
            self._probe_locked()
            return self._throttling

    @property
    def throttling(self) -> bool:
        return self._throttling

    def wait_for_headroom(self, stop: threading.Event, timeout: Optional[float] = None,
                          relieve: Optional[Callable[[], None]] = None) -> bool:
        """Block while throttling; True once there is headroom, False on `stop` or after `timeout` s.

        `relieve` is called once before the first wait (e.g. ``torch.cuda.empty_cache``) so that memory
        this process caches but does not use does not hold the reading above ``mem_low``. On False the
        caller decides: the pipeline proceeds with the (shrunk) budget and relies on OOM splitting.
        """
        if not self.active or not self.should_wait():
            return True
        if relieve is not None:
            relieve()
        start = time.monotonic()
        try:
            while True:
                if stop.is_set():
                    return False
                elapsed = time.monotonic() - start
                if timeout is not None and elapsed >= timeout:
                    return False
                pause = self.poll_interval_s if timeout is None else min(self.poll_interval_s, timeout - elapsed)
                stop.wait(max(pause, 0.0))  # the producer sleeps here; `stop` wakes it at once
                if not self.should_wait():
                    return True
        finally:
            with self._lock:
                self.waits += 1
                self.wait_seconds += time.monotonic() - start

    @property
    def holding(self) -> bool:
        """True for ``gpu.oom_hold_s`` after a CUDA OOM: no budget growth, no CUDA graph capture."""
        return self._clock() < self._hold_until

    def batch_token_budget(self, base: int) -> int:
        """Padded tokens the next batch may hold: `base` without pressure, halved per fresh reading
        above mem_high down to ``min_batch_tokens``, doubled per fresh reading below mem_low, and held
        down (halved once per OOM, no growth) for ``gpu.oom_hold_s`` after each CUDA OOM."""
        if base < 1:
            raise ValueError(f"base budget must be >= 1 (got {base})")
        if not self.active and self._budget is None and not self._oom_halvings:
            return base  # the common no-GPU / no-NVML case: nothing to remember
        with self._lock:
            floor = min(base, self.min_batch_tokens)
            cur = base if self._budget is None else max(floor, min(self._budget, base))
            while self._oom_halvings:  # OOMs that came before any budget existed
                self._oom_halvings -= 1
                cur = max(floor, cur // 2)
            holding = self._clock() < self._hold_until
            if self.active:
                reading = self._probe_locked()
                if self._seq != self._budget_seq:  # one step per fresh probe, however often we are asked
                    self._budget_seq = self._seq
                    frac = reading.fraction
                    if frac > self.mem_high and cur > floor:
                        cur = max(floor, cur // 2)
                        self.budget_shrinks += 1
                    elif frac < self.mem_low and cur < base and not holding:
                        cur = min(base, cur * 2)
                        self.budget_grows += 1
            elif not holding and cur < base:  # no readings to grow by: the hold is over, back to base
                cur = base
                self.budget_grows += 1
            self._budget = cur
            return cur

    def note_oom(self) -> None:
        """A batch hit CUDA out-of-memory: halve the budget now (without waiting for a probe) and hold
        it down for ``gpu.oom_hold_s``. A no-op for a governor of CPU work (``device_index=None``)."""
        if self.device_index is None:
            return
        with self._lock:
            self.oom_events += 1
            self._hold_until = self._clock() + self.oom_hold_s
            if self._budget is None:
                self._oom_halvings += 1
            elif self._budget > self.min_batch_tokens:
                self._budget = max(self.min_batch_tokens, self._budget // 2)
            self.budget_shrinks += 1

    def metrics(self) -> dict[str, Any]:
        """Counters for the run's metrics report."""
        with self._lock:
            return {
                "active": self.active,
                "reason": self.reason,
                "source": self.source,
                "oom_events": self.oom_events,
                "holding": self._clock() < self._hold_until,
                "mem_low": self.mem_low,
                "mem_high": self.mem_high,
                "throttle_events": self.throttle_events,
                "throttling": self._throttling,
                "waits": self.waits,
                "wait_seconds": round(self.wait_seconds, 6),
                "budget_shrinks": self.budget_shrinks,
                "budget_grows": self.budget_grows,
                "budget": self._budget,
                "probes": self.probes,
                "probe_failures": self.probe_failures,
                "max_used_bytes": self.max_used_bytes,
                "total_bytes": self.total_bytes,
            }

    snapshot = metrics  # the pipeline's metrics report calls `snapshot()`

    def close(self) -> None:
        """Nothing to release: NVML stays initialised for the process (nvmlInit is reference counted
        and other users may share it)."""
