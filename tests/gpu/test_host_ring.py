"""HostBufferRing: buffers allocated once and cycled, bounded acquisition, release errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hades_gpu.gpu.host_ring import HostBufferRing


def test_slots_are_reused_same_addresses_cycle():
    ring = HostBufferRing(slots=3, max_rows=4, max_len=16)
    initial = {ring.buffer_address(s) for s in range(3)}
    assert len(initial) == 3
    seen = []
    for i in range(12):
        slot = ring.acquire(timeout=1.0)
        assert slot is not None
        ids, mask = ring.views(slot, rows=2 + i % 3, length=16)
        ids[:] = i
        mask[:] = 1
        addr = int(ids.__array_interface__["data"][0])
        assert addr == ring.buffer_address(slot)  # the view writes into the slot's own buffer
        seen.append(addr)
        ring.release(slot)
    assert set(seen) == initial  # nothing new allocated: the same buffers go round ...
    assert seen[:3] * 4 == seen  # ... in turn, one after another
    assert ring.acquire_count == 12 and ring.free_slots == 3


def test_views_are_contiguous_and_bounded():
    ring = HostBufferRing(slots=2, max_rows=8, max_len=32)
    ids, mask = ring.views(0, rows=3, length=16)
    assert ids.shape == mask.shape == (3, 16) and ids.flags.c_contiguous and ids.dtype == np.int64
    with pytest.raises(ValueError, match=r"exceeds ring buffers \(8, 32\)"):
        ring.views(0, rows=9, length=16)
    with pytest.raises(ValueError, match="exceeds"):
        ring.views(0, rows=2, length=33)


def test_acquire_blocks_when_all_slots_are_out():
    ring = HostBufferRing(slots=2, max_rows=2, max_len=8)
    a, b = ring.acquire(), ring.acquire()
    assert {a, b} == {0, 1} and ring.free_slots == 0
    t0 = time.monotonic()
    assert ring.acquire(timeout=0.05) is None  # bounded: times out instead of blocking forever
    assert time.monotonic() - t0 >= 0.04
    assert ring.wait_count == 1

    got: list = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(timeout=5.0)))
    waiter.start()
    time.sleep(0.05)
    assert not got  # still waiting for a slot
    ring.release(b)
    waiter.join(timeout=5.0)
    assert got == [b]


def test_release_errors():
    ring = HostBufferRing(slots=2, max_rows=2, max_len=8)
    with pytest.raises(ValueError, match="slot 0 is not in use"):
        ring.release(0)  # never acquired
    slot = ring.acquire()
    ring.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        ring.release(slot)  # twice
    with pytest.raises(ValueError, match="slot 7 is not in use"):
        ring.release(7)  # out of range


def test_construction_errors_and_size():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        HostBufferRing(slots=0, max_rows=1, max_len=1)
    with pytest.raises(ValueError, match="max_rows and max_len"):
        HostBufferRing(slots=1, max_rows=0, max_len=1)
    ring = HostBufferRing(slots=3, max_rows=4, max_len=16)
    assert ring.nbytes == 2 * 3 * 4 * 16 * 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_plain_memory_without_cuda():
    assert HostBufferRing(slots=1, max_rows=2, max_len=8).pinned is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_once_with_cuda():
    ring = HostBufferRing(slots=2, max_rows=4, max_len=16)
    assert ring.pinned
    slot = ring.acquire()
    ids, _ = ring.views(slot, 2, 16)
    assert torch.from_numpy(ids).is_pinned()  # views of the ring stay page-locked
    ring.release(slot)
