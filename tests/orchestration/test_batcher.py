import numpy as np

from hades_gpu.gpu.host_ring import HostBufferRing
from hades_gpu.orchestration.batcher import LengthSortedBatcher, bucket_length, fill_batch
from hades_gpu.records import Chunk


def chunk(n, i=0):
    return Chunk(doc_id="d", chunk_id=f"c{i}", path="p", modality="prose", ordinal=i, char_start=0, char_end=1,
                 text="x", token_ids=np.arange(1000, 1000 + n, dtype=np.int32))


def test_bucket_length():
    assert bucket_length(1, 16, 256) == 16
    assert bucket_length(16, 16, 256) == 16
    assert bucket_length(17, 16, 256) == 32
    assert bucket_length(300, 16, 256) == 256


def test_batches_respect_budget_and_keep_every_chunk():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 255, size=500)
    b = LengthSortedBatcher(max_batch_tokens=2048, max_batch_size=32, length_bucket=8, max_seq_len=256,
                            lookahead_batches=32)
    plans = []
    for i, n in enumerate(lengths):
        plans += b.add([chunk(int(n), i)])
    plans += b.flush()
    ids = sorted(c.chunk_id for p in plans for c in p.chunks)
    assert ids == sorted(f"c{i}" for i in range(500))
    for p in plans:
        assert p.padded_tokens <= 2048 and len(p.chunks) <= 32
        assert p.length % 8 == 0 and all(c.n_tokens + 2 <= p.length for c in p.chunks)
    real = sum(c.n_tokens + 2 for p in plans for c in p.chunks)
    padded = sum(p.padded_tokens for p in plans)
    assert real / padded > 0.9  # sorting inside the window keeps padding small


def test_fill_batch_layout_and_ring_reuse():
    ring = HostBufferRing(slots=2, max_rows=4, max_len=32, pin=False)
    b = LengthSortedBatcher(4 * 32, 4, 16, 32, 1)
    b.add([chunk(3, 0), chunk(10, 1)])
    (plan,) = b.flush()
    slot = ring.acquire()
    addr = ring.buffer_address(slot)
    batch = fill_batch(plan, ring, slot, cls_id=101, sep_id=102, pad_id=0)
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0, 0] == 101 and batch.input_ids[0, 4] == 102 and batch.input_ids[0, 5] == 0
    assert list(batch.attention_mask[0]) == [1] * 5 + [0] * 11
    assert batch.real_tokens == 5 + 12
    ring.release(slot)
    assert ring.buffer_address(ring.acquire()) in (addr, ring.buffer_address(1 - slot))
