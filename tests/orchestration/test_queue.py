import threading
import time
from dataclasses import dataclass

import pytest

from hades_gpu.orchestration.queue import MemoryAwareQueue, PipelineAborted, QueueClosed


@dataclass
class Blob:
    nbytes: int
    n: int = 0


def make_queue(**kw):
    args = dict(max_bytes=1000, max_items=100, high_watermark=0.8, low_watermark=0.4,
                backoff_initial_s=0.001, backoff_max_s=0.01)
    args.update(kw)
    return MemoryAwareQueue("q", **args)


def test_rejects_bad_watermarks():
    with pytest.raises(ValueError, match="0 < low < high"):
        make_queue(high_watermark=0.3, low_watermark=0.5)


def test_fifo_and_close_drains():
    q = make_queue()
    for i in range(5):
        q.put(Blob(10, i))
    q.close()
    assert [q.get().n for _ in range(5)] == list(range(5))
    with pytest.raises(QueueClosed):
        q.get()
    with pytest.raises(QueueClosed):
        q.put(Blob(1))


def test_slow_consumer_bounds_queued_bytes():
    q = make_queue()
    produced = 200

    def producer():
        for i in range(produced):
            q.put(Blob(50, i))
        q.close()

    t = threading.Thread(target=producer)
    t.start()
    got = []
    while True:
        try:
            got.append(q.get().n)
        except QueueClosed:
            break
        time.sleep(0.001)
    t.join()
    stats = q.stats()
    assert got == list(range(produced))
    assert stats.peak_bytes <= 800  # never above the high watermark
    assert stats.put_waits > 0 and stats.put_wait_s > 0


def test_hysteresis_resumes_only_below_low_watermark():
    q = make_queue()
    for i in range(16):  # 800 bytes: at the high watermark
        assert q.put(Blob(50, i), timeout=0.01)
    assert not q.put(Blob(50), timeout=0.02)  # blocked
    for _ in range(4):  # 600 bytes: below high but above low -> still blocked
        q.get()
    assert not q.put(Blob(50), timeout=0.02)
    for _ in range(5):  # 350 bytes: below low
        q.get()
    assert q.put(Blob(50), timeout=0.02)


def test_item_cap():
    q = make_queue(max_items=3)
    for i in range(3):
        q.put(Blob(1, i))
    assert not q.put(Blob(1), timeout=0.02)


def test_oversized_item_admitted_when_empty():
    q = make_queue()
    assert q.put(Blob(5000), timeout=0.01)
    assert not q.put(Blob(1), timeout=0.02)


def test_abort_wakes_blocked_threads():
    q = make_queue(max_items=1)
    q.put(Blob(1))
    errors = []

    def blocked_put():
        try:
            q.put(Blob(1))
        except PipelineAborted as err:
            errors.append(err)

    t = threading.Thread(target=blocked_put)
    t.start()
    time.sleep(0.05)
    q.abort(RuntimeError("boom"))
    t.join(timeout=2)
    assert not t.is_alive()
    assert errors and isinstance(errors[0].__cause__, RuntimeError)


def test_abort_drops_what_was_queued_and_its_bytes():
    q = MemoryAwareQueue("q", max_bytes=1000, max_items=10)
    q.put(b"x" * 100)
    q.put(b"y" * 50)
    q.abort(RuntimeError("boom"))
    st = q.stats()
    assert st.items == 0 and st.bytes == 0


def test_edges_of_the_arguments_and_exact_wait_counts():
    """The smallest valid queue is accepted; a put that had to wait counts once however long it
    waited; a closed queue names itself."""
    tiny = MemoryAwareQueue("tiny", max_bytes=1, max_items=1)
    assert tiny.put(b"", timeout=0.1)
    with pytest.raises(ValueError):
        MemoryAwareQueue("none", max_bytes=0, max_items=1)
    with pytest.raises(ValueError):
        MemoryAwareQueue("none", max_bytes=1, max_items=0)
    q = make_queue()
    for _ in range(8):  # 800 bytes: at the high watermark
        q.put(Blob(100))
    done = threading.Event()
    threading.Thread(target=lambda: (q.put(Blob(100)), done.set()), daemon=True).start()
    time.sleep(0.2)  # blocked, retrying with backoff several times
    for _ in range(5):
        q.get()
    assert done.wait(5)
    assert q.stats().put_waits == 1
    q.close()
    while len(q):
        q.get()
    with pytest.raises(QueueClosed, match="'q' is closed"):
        q.put(Blob(1))
