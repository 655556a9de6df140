"""isne.host_heap: inside `keep_freed_memory` a large allocation comes from the heap (no new mapping),
outside it from a fresh mmap as glibc does by default; the defaults come back afterwards."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from hades_gpu.isne.host_heap import _glibc, keep_freed_memory

_LIBC = _glibc()  # the module's own lookup: None off glibc

pytestmark = pytest.mark.skipif(_LIBC is None or not hasattr(_LIBC, "mallinfo2"),  # mallinfo2: glibc >= 2.33
                                reason="glibc's mallopt and mallinfo2 only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in mmap'd chunks (mallinfo2's hblkhd), for this thread's view of malloc."""
    _LIBC.mallinfo2.restype = _MallInfo2
    return int(_LIBC.mallinfo2().hblkhd)


BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmap'd by default


def _mapped_by_big_allocation() -> int:
    before = _mapped_bytes()
    buf = np.empty(BIG, dtype=np.uint8)  # numpy's data comes from malloc
    grown = _mapped_bytes() - before
    del buf
    return grown


def test_a_large_allocation_is_not_mapped_inside_and_is_again_afterwards():
    assert _mapped_by_big_allocation() >= BIG  # glibc's default: a fresh mapping
    with keep_freed_memory() as active:
        assert active is True
        assert _mapped_by_big_allocation() == 0
    assert _mapped_by_big_allocation() >= BIG  # defaults restored


def test_disabled_changes_nothing():
    with keep_freed_memory(False) as active:
        assert active is False
        assert _mapped_by_big_allocation() >= BIG


def test_nested_and_concurrent_users_restore_only_when_the_last_leaves():
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with keep_freed_memory():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with keep_freed_memory():
        t.start()
        assert entered.wait(10)
    # the other user is still inside: the setting stays
    assert _mapped_by_big_allocation() == 0
    release.set()
    t.join(10)
    assert _mapped_by_big_allocation() >= BIG


def test_training_on_the_cpu_runs_inside_it(monkeypatch):
    """train_isne enters the context on the CPU (and only there) with isne.keep_freed_memory."""
    import torch

    from hades_gpu.config import IsneConfig
    from hades_gpu.isne import trainer

    seen: list[bool] = []
    real = trainer.keep_freed_memory

    def spy(enabled: bool = True):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(trainer, "keep_freed_memory", spy)
    ring = torch.arange(20)
    ei = torch.stack([torch.cat([ring, (ring + 1) % 20]), torch.cat([(ring + 1) % 20, ring])])
    cfg = IsneConfig(device="cpu", epochs=1, batch_size=8, val_fraction=0.0, early_stop="off")
    trainer.train_isne(ei, 20, cfg)
    cfg.keep_freed_memory = False
    trainer.train_isne(ei, 20, cfg)
    assert seen == [True, False]
