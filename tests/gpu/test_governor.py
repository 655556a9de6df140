"""MemoryGovernor with an injected memory reader: hysteresis, caching, probe failures, budget, validation,
and the inactive (no GPU) governor."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from hades_gpu.config import GpuConfig
from hades_gpu.gpu.nvml_governor import MemoryGovernor

TOTAL = 80 * 2**30


class ScriptedReader:
    """Returns used fractions from a script (the last one repeats); an Exception entry is raised."""

    def __init__(self, *fractions: "float | Exception") -> None:
        self.script = list(fractions)
        self.calls = 0

    def __call__(self) -> tuple[int, int]:
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(item, Exception):
            raise item
        return int(item * TOTAL), TOTAL


def gov(reader, poll: float = 1e-9, **kw) -> MemoryGovernor:
    cfg = GpuConfig(mem_high=kw.pop("mem_high", 0.9), mem_low=kw.pop("mem_low", 0.75), poll_interval_s=poll,
                    min_batch_tokens=kw.pop("min_batch_tokens", 512))
    return MemoryGovernor(cfg, device_index=0, reader=reader)


@pytest.mark.parametrize("low, high", [(0.9, 0.8), (0.8, 0.8), (0.0, 0.5), (0.5, 1.2), (-0.1, 0.5)])
def test_thresholds_validated_at_construction(low, high):
    with pytest.raises(ValueError) as info:
        MemoryGovernor(GpuConfig(mem_low=low, mem_high=high), reader=ScriptedReader(0.1))
    msg = str(info.value)
    assert "mem_low" in msg and "mem_high" in msg and f"mem_low={low}" in msg and f"mem_high={high}" in msg


def test_other_values_validated():
    with pytest.raises(ValueError, match="poll_interval_s"):
        MemoryGovernor(GpuConfig(poll_interval_s=0), reader=ScriptedReader(0.1))
    with pytest.raises(ValueError, match="min_batch_tokens"):
        MemoryGovernor(GpuConfig(min_batch_tokens=0), reader=ScriptedReader(0.1))


def test_hysteresis_starts_above_high_stops_below_low(caplog):
    reader = ScriptedReader(0.5, 0.95, 0.85, 0.80, 0.76, 0.70, 0.85, 0.89, 0.91, 0.5)
    g = gov(reader)
    caplog.set_level(logging.INFO, logger="hades_gpu.gpu.nvml_governor")
    got = [g.should_wait() for _ in range(10)]
    #        0.5    0.95  0.85  0.80  0.76  0.70   0.85   0.89   0.91  0.5
    assert got == [False, True, True, True, True, False, False, False, True, False]
    assert g.throttle_events == 2
    lines = [r.getMessage() for r in caplog.records]
    assert sum("throttling GPU producers" in m for m in lines) == 2  # once per start ...
    assert sum("throttling stopped" in m for m in lines) == 2  # ... and once per stop, nothing between


def test_readings_are_cached_for_the_poll_interval():
    reader = ScriptedReader(0.5)
    g = gov(reader, poll=0.05)
    for _ in range(200):
        g.should_wait()
        g.batch_token_budget(8192)
    assert reader.calls == 1
    time.sleep(0.06)
    g.should_wait()
    assert reader.calls == 2
    g.reading(force=True)
    assert reader.calls == 3


def test_probe_failure_reuses_last_good_reading(caplog):
    reader = ScriptedReader(0.95, RuntimeError("nvml hiccup"))
    g = gov(reader)
    caplog.set_level(logging.INFO, logger="hades_gpu.gpu.nvml_governor")
    assert g.should_wait()
    for _ in range(5):
        assert g.should_wait()  # still under pressure: a failed probe is not "no pressure"
    assert g.probe_failures == 5
    r = g.reading()
    assert r is not None and not r.ok and r.fraction == pytest.approx(0.95)
    assert sum("probe failed" in rec.getMessage() for rec in caplog.records) == 1  # once per failure streak


def test_probe_failure_before_any_reading_counts_as_full():
    g = gov(ScriptedReader(OSError("no driver answer"), 0.1))
    assert g.should_wait() is True  # never "no pressure" by default
    assert g.should_wait() is False  # first good reading: 10% used, below mem_low


def test_budget_shrinks_per_probe_above_high_and_grows_back_below_low():
    reader = ScriptedReader(*([0.95] * 6 + [0.8] * 2 + [0.5] * 6))
    g = gov(reader, min_batch_tokens=512)
    seq = [g.batch_token_budget(8192) for _ in range(14)]
    assert seq == [4096, 2048, 1024, 512, 512, 512,  # x0.5 per step, floor min_batch_tokens
                   512, 512,  # between the thresholds: hold
                   1024, 2048, 4096, 8192, 8192, 8192]  # x2 below mem_low, capped at base
    assert g.budget_shrinks == 4
    assert g.budget_grows == 4


def test_budget_steps_once_per_fresh_reading():
    reader = ScriptedReader(0.95)
    g = gov(reader, poll=60.0)
    assert [g.batch_token_budget(8192) for _ in range(5)] == [4096] * 5
    assert g.budget_shrinks == 1


def test_budget_never_exceeds_a_small_base_and_oom_halves_it():
    g = gov(ScriptedReader(0.95), min_batch_tokens=512)
    assert g.batch_token_budget(300) == 300  # base below the floor: the base itself
    g2 = gov(ScriptedReader(0.5), poll=60.0, min_batch_tokens=512)
    assert g2.batch_token_budget(8192) == 8192
    g2.note_oom()
    assert g2.batch_token_budget(8192) == 4096
    assert g2.budget_shrinks == 1


def test_wait_for_headroom_waits_until_below_low_and_counts():
    reader = ScriptedReader(0.95, 0.95, 0.85, 0.85, 0.6)
    g = gov(reader, poll=0.01)
    relieved = []
    assert g.wait_for_headroom(threading.Event(), timeout=5.0, relieve=lambda: relieved.append(1)) is True
    assert relieved == [1]
    assert g.waits == 1 and g.wait_seconds > 0
    assert g.metrics()["throttle_events"] == 1
    assert g.wait_for_headroom(threading.Event(), timeout=5.0) is True  # no pressure: no wait
    assert g.waits == 1


def test_wait_for_headroom_stops_on_event_and_timeout():
    g = gov(ScriptedReader(0.99), poll=0.01)
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    t0 = time.monotonic()
    assert g.wait_for_headroom(stop, timeout=None) is False
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert g.wait_for_headroom(threading.Event(), timeout=0.05) is False
    assert 0.04 <= time.monotonic() - t0 < 2.0
    assert g.waits == 2


def test_inactive_without_gpu_costs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="hades_gpu.gpu.nvml_governor")
    g = MemoryGovernor(GpuConfig(), device_index=None)
    assert g.active is False and "no GPU" in g.reason
    assert sum("inactive" in r.getMessage() for r in caplog.records) == 1
    t0 = time.perf_counter()
    for _ in range(10_000):
        assert g.should_wait() is False
        assert g.batch_token_budget(8192) == 8192
    assert g.wait_for_headroom(threading.Event(), timeout=None) is True
    g.note_oom()
    assert time.perf_counter() - t0 < 1.0
    assert g.reading() is None
    assert g.metrics()["probes"] == 0 and g.metrics()["active"] is False
    assert sum("inactive" in r.getMessage() for r in caplog.records) == 1  # reported once


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU: the default governor is active")
def test_default_reader_inactive_on_a_box_without_gpu():
    g = MemoryGovernor(GpuConfig(), device_index=0)
    assert g.active is False
    assert g.reason
    assert g.should_wait() is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvml_reader_on_gpu():
    g = MemoryGovernor(GpuConfig(), device_index=0)
    assert g.active, g.reason
    r = g.reading(force=True)
    assert r is not None and r.ok and 0 < r.fraction <= 1 and r.total > 2**30
