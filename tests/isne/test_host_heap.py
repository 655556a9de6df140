"""isne.host_heap: inside `keep_freed_memory` a large allocation comes from the heap (no new mapping),
outside it from a fresh mmap as glibc does by default; the defaults come back afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hades_gpu.isne.host_heap import _glibc

_LIBC = _glibc()  # the module's own lookup: None off glibc

pytestmark = pytest.mark.skipif(_LIBC is None or not hasattr(_LIBC, "mallinfo2"),  # mallinfo2: glibc >= 2.33
                                reason="glibc's mallopt and mallinfo2 only")


# Each allocator check runs in a fresh interpreter: glibc's malloc settings and its mappings are
# process-wide, so a long test process (hundreds of earlier tests, libraries that map memory) is not
# a clean "glibc default" to compare against (a full-suite run once saw no fresh mapping at all).
_HELPERS = """
import ctypes, json, sys, threading
import numpy as np
from hades_gpu.isne.host_heap import _glibc, keep_freed_memory
libc = _glibc()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc.mallinfo2.restype = MallInfo2
BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmap'd by default

def mapped_by_big_allocation():
    before = int(libc.mallinfo2().hblkhd)  # bytes in mmap'd chunks
    buf = np.empty(BIG, dtype=np.uint8)  # numpy's data comes from malloc
    grown = int(libc.mallinfo2().hblkhd) - before
    del buf
    return grown
"""

_SCENARIOS = {
    "inside_and_after": """
out = {"before": mapped_by_big_allocation()}
with keep_freed_memory() as active:
    out["active"] = active
    out["inside"] = mapped_by_big_allocation()
out["after"] = mapped_by_big_allocation()
""",
    "disabled": """
with keep_freed_memory(False) as active:
    out = {"active": active, "inside": mapped_by_big_allocation()}
""",
    "nested_and_concurrent": """
entered, release = threading.Event(), threading.Event()
def other():
    with keep_freed_memory():
        entered.set()
        release.wait(10)
t = threading.Thread(target=other)
with keep_freed_memory():
    t.start()
    assert entered.wait(10)
out = {"other_still_inside": mapped_by_big_allocation()}  # the other user is still inside
release.set()
t.join(10)
out["all_left"] = mapped_by_big_allocation()
""",
}


def _run(scenario: str) -> dict:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = _HELPERS + _SCENARIOS[scenario] + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


BIG = 64 * 2**20


def test_a_large_allocation_is_not_mapped_inside_and_is_again_afterwards():
    out = _run("inside_and_after")
    assert out["before"] >= BIG  # glibc's default: a fresh mapping
    assert out["active"] is True and out["inside"] == 0
    assert out["after"] >= BIG  # defaults restored


def test_disabled_changes_nothing():
    out = _run("disabled")
    assert out["active"] is False and out["inside"] >= BIG


def test_nested_and_concurrent_users_restore_only_when_the_last_leaves():
    out = _run("nested_and_concurrent")
    assert out["other_still_inside"] == 0 and out["all_left"] >= BIG


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
