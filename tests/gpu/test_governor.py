"""MemoryGovernor with an injected memory reader: hysteresis, caching, probe failures, budget, validation,
and the inactive (no GPU) governor."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from hades_gpu.config import GpuConfig
from hades_gpu.gpu.nvml import find_nvml_handle, nvml_uuid_candidates, torch_device_uuid
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


class Clock:
    """A hand-moved monotonic clock for the OOM hold."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gov(reader, poll: float = 1e-9, clock=time.monotonic, **kw) -> MemoryGovernor:
    cfg = GpuConfig(mem_high=kw.pop("mem_high", 0.9), mem_low=kw.pop("mem_low", 0.75), poll_interval_s=poll,
                    min_batch_tokens=kw.pop("min_batch_tokens", 512), oom_hold_s=kw.pop("oom_hold_s", 10.0))
    return MemoryGovernor(cfg, device_index=0, reader=reader, clock=clock)


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


def test_oom_holds_the_budget_down_while_readings_say_memory_is_free():
    """The thrash loop: after an OOM the memory is released, so every fresh reading is far below
    mem_low; the budget must not double straight back to the size that just ran out of memory."""
    clock = Clock()
    g = gov(ScriptedReader(0.3), clock=clock, oom_hold_s=10.0, min_batch_tokens=512)
    assert g.batch_token_budget(8192) == 8192
    g.note_oom()
    assert g.holding
    held = [g.batch_token_budget(8192) for _ in range(50)]  # 50 fresh readings at 30% used
    assert held == [4096] * 50
    clock.now += 6.0
    g.note_oom()  # a second OOM inside the hold halves again and restarts the hold
    clock.now += 9.0  # 15 s after the first OOM, 9 s after the second: still held
    assert g.batch_token_budget(8192) == 2048 and g.holding
    clock.now += 1.5
    assert not g.holding
    assert [g.batch_token_budget(8192) for _ in range(3)] == [4096, 8192, 8192]  # growth resumes
    m = g.metrics()
    assert m["oom_events"] == 2 and m["holding"] is False


def test_oom_hold_works_without_nvml_and_before_any_budget():
    """No NVML on a GPU box (governor inactive): an OOM still halves and holds, then the base returns."""
    clock = Clock()
    g = MemoryGovernor(GpuConfig(oom_hold_s=5.0, min_batch_tokens=256), device_index=3, reader=None, clock=clock)
    assert g.active is False
    g.note_oom()  # before the first budget was asked for
    assert g.holding
    assert g.batch_token_budget(4096) == 2048
    assert g.batch_token_budget(4096) == 2048
    clock.now += 5.1
    assert g.batch_token_budget(4096) == 4096


def test_cpu_governor_ignores_oom():
    g = MemoryGovernor(GpuConfig(), device_index=None)
    g.note_oom()
    assert not g.holding and g.batch_token_budget(4096) == 4096


# -- NVML device matching ---------------------------------------------------------------------------


class FakeNvml:
    """Stand-in for pynvml with several GPUs and MIG slices: the only way to check device matching on
    a box without GPUs (the real check is test_nvml_handle_matches_the_torch_device, marked gpu)."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: dict[str, int]) -> None:
        self.devices = devices  # uuid -> MIG mode (1 = enabled)
        self.by_index = list(devices)

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> str:
        text = uuid.decode()
        if text not in self.devices:
            raise self.NVMLError("Not Found")
        return text

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # never the right thing to call
        raise AssertionError("device matched by index")

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return handle

    def nvmlDeviceGetMigMode(self, handle: str) -> tuple[int, int]:
        if handle.startswith("MIG-"):
            raise self.NVMLError("Not Supported")
        return self.devices[handle], self.devices[handle]


def test_nvml_handle_found_by_uuid_not_index():
    # CUDA_VISIBLE_DEVICES=2,0: CUDA device 0 is NVML device 2
    nvml = FakeNvml({"GPU-aaaa": 0, "GPU-bbbb": 0, "GPU-cccc": 0})
    handle, detail = find_nvml_handle(nvml, "cccc")
    assert handle == "GPU-cccc" and detail == "GPU-cccc"
    handle, detail = find_nvml_handle(nvml, "dddd")
    assert handle is None and "dddd" in detail


def test_mig_slice_found_and_mig_mode_gpu_refused():
    nvml = FakeNvml({"GPU-aaaa": 1, "MIG-1111": 0})
    assert find_nvml_handle(nvml, "1111")[0] == "MIG-1111"  # CUDA_VISIBLE_DEVICES=MIG-1111
    handle, detail = find_nvml_handle(nvml, "aaaa")  # the whole GPU, whose counters span every slice
    assert handle is None and "MIG mode" in detail


def test_nvml_uuid_spellings():
    assert nvml_uuid_candidates("ab-cd") == ["GPU-ab-cd", "MIG-ab-cd"]
    assert nvml_uuid_candidates("GPU-ab-cd") == ["GPU-ab-cd"]
    assert nvml_uuid_candidates(" MIG-x ") == ["MIG-x"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvml_handle_matches_the_torch_device():
    import pynvml

    pynvml.nvmlInit()
    for index in range(torch.cuda.device_count()):
        uuid = torch_device_uuid(index)
        assert uuid
        handle, detail = find_nvml_handle(pynvml, uuid)
        assert handle is not None, detail
        nvml_uuid = pynvml.nvmlDeviceGetUUID(handle)
        nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else nvml_uuid
        assert nvml_uuid.split("-", 1)[1] == uuid
        g = MemoryGovernor(GpuConfig(), device_index=index)
        assert g.active and g.source == f"nvml {nvml_uuid}", g.source
        # NVML's total is the device torch sees (MiB rounding and reserved memory aside)
        total = torch.cuda.get_device_properties(index).total_memory
        assert abs(g.reading(force=True).total - total) < 0.05 * total
