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


def reference_row(token_ids, length, cls=101, sep=102, pad=7):
    content = list(token_ids[: length - 2])
    row = [cls, *content, sep]
    return row + [pad] * (length - len(row)), [1] * len(row) + [0] * (length - len(row))


def test_fill_batch_writes_every_row_exactly_over_a_dirty_slot():
    """Every row: [CLS] ids [SEP] then the pad id, mask 1 on real tokens; a slot holding an older,
    longer batch is overwritten entirely; over-long chunks are truncated to the plan length."""
    ring = HostBufferRing(slots=1, max_rows=4, max_len=24, pin=False)
    slot = ring.acquire()
    ids, mask = ring.views(slot, 4, 24)
    ids.fill(999)
    mask.fill(1)
    from hades_gpu.orchestration.batcher import BatchPlan

    chunks = [chunk(3, 0), chunk(14, 1), chunk(30, 2)]  # the last is longer than the plan
    plan = BatchPlan(chunks, 16)
    for r, s in ((ring, slot), (None, -1)):
        batch = fill_batch(plan, r, s, cls_id=101, sep_id=102, pad_id=7)
        assert batch.input_ids.shape == batch.attention_mask.shape == (3, 16)
        for row, c in enumerate(chunks):
            want_ids, want_mask = reference_row(c.token_ids, 16)
            assert batch.input_ids[row].tolist() == want_ids and batch.attention_mask[row].tolist() == want_mask
        assert batch.real_tokens == 5 + 16 + 16 == int(batch.attention_mask.sum())
        assert batch.slot == s and batch.chunks is chunks
        assert batch.input_ids.dtype == np.int64 and batch.attention_mask.dtype == np.int64


def test_seq_len_window_and_budget_function():
    b = LengthSortedBatcher(max_batch_tokens=64, max_batch_size=4, length_bucket=8, max_seq_len=32,
                            lookahead_batches=2, budget_fn=lambda base: base // 2)
    assert b.seq_len(chunk(5)) == 7 and b.seq_len(chunk(40)) == 32  # + CLS/SEP, capped
    assert b._budget() == 32  # the governor's budget, never below max_seq_len
    b2 = LengthSortedBatcher(64, 4, 8, 32, 2, budget_fn=lambda base: 1)
    assert b2._budget() == 32
    b3 = LengthSortedBatcher(64, 4, 8, 32, 2, budget_fn=lambda base: 10 * base)
    assert b3._budget() == 64  # never above max_batch_tokens
    # the window holds 2 x 64 tokens: nothing comes out before it is full
    assert b.add([chunk(6, i) for i in range(15)]) == []  # 15 x 8 = 120 tokens < 128
    plans = b.add([chunk(6, 15)])  # 128: cut, keeping the last (partial) batch back
    assert plans and all(p.length == 8 and len(p.chunks) == 4 for p in plans)  # 4 x 8 = 32 = budget
    rest = b.flush()
    assert sum(len(p.chunks) for p in plans + rest) == 16 and b.flush() == []


def test_batches_are_cut_by_rows_and_by_tokens_exactly():
    b = LengthSortedBatcher(max_batch_tokens=96, max_batch_size=3, length_bucket=8, max_seq_len=64,
                            lookahead_batches=100)
    b.add([chunk(6, i) for i in range(7)])  # seq 8 each: rows cap 3 -> 3, 3, 1
    assert [len(p.chunks) for p in b.flush()] == [3, 3, 1]
    b.add([chunk(30, i) for i in range(4)])  # seq 32 each: 3 x 32 = 96 fits, a 4th would not
    assert [(len(p.chunks), p.length) for p in b.flush()] == [(3, 32), (1, 32)]
    b.add([chunk(6, 0), chunk(38, 1)])  # 8 then 40: together 2 x 40 = 80 <= 96, one batch at 40
    assert [(len(p.chunks), p.length) for p in b.flush()] == [(2, 40)]
    b.add([chunk(6, 0), chunk(6, 1), chunk(46, 2)])  # 3 x 48 = 144 > 96: the long one alone
    assert [(len(p.chunks), p.length) for p in b.flush()] == [(2, 8), (1, 48)]


def test_a_budget_of_exactly_one_longest_sequence_is_allowed():
    import pytest

    from hades_gpu.orchestration.batcher import LengthSortedBatcher

    LengthSortedBatcher(256, 4, 8, 256, 2)  # max_batch_tokens == max_seq_len: one full row per batch
    with pytest.raises(ValueError, match=r"max_batch_tokens must be >= max_seq_len \(got 255 < 256\)"):
        LengthSortedBatcher(255, 4, 8, 256, 2)
