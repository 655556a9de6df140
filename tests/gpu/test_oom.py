"""OOM splitting with a forward that raises CUDA out-of-memory above N rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hades_gpu.gpu.oom import OomSplitError, SplitCounter, embed_with_oom_split, is_cuda_oom

DIM = 16
W = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)


def reference(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A row-wise function of the inputs (so any mix-up of rows shows)."""
    out = np.zeros((ids.shape[0], DIM), dtype=np.float32)
    for i in range(ids.shape[0]):  # row by row, so the batch size cannot change the arithmetic
        feats = np.zeros(64, dtype=np.float32)
        np.add.at(feats, ids[i][mask[i] > 0] % 64, 1.0)
        row = feats @ W
        out[i] = row / np.linalg.norm(row)
    return out


class OomAbove:
    def __init__(self, max_rows: int, error: type | None = None) -> None:
        self.max_rows = max_rows
        self.calls: list[int] = []
        self.error = error

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls.append(ids.shape[0])
        if ids.shape[0] > self.max_rows:
            if self.error is RuntimeError:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return reference(ids, mask)


def batch(rows: int, length: int = 24, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 30000, size=(rows, length), dtype=np.int64)
    lengths = rng.integers(2, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


@pytest.mark.parametrize("rows, limit", [(10, 3), (64, 7), (33, 1), (5, 5), (17, 16)])
def test_all_rows_returned_in_order_identical_to_unsplit(rows, limit):
    ids, mask = batch(rows)
    forward = OomAbove(limit)
    counter = SplitCounter()
    released = []
    got = embed_with_oom_split(forward, ids, mask, on_oom=lambda: released.append(1), counter=counter)
    want = reference(ids, mask)
    assert got.shape == (rows, DIM)
    np.testing.assert_array_equal(got, want)
    successful = [n for n in forward.calls if n <= limit]
    assert sum(successful) == rows  # every row computed exactly once: none dropped, none twice
    assert counter.oom_errors == counter.splits == len(forward.calls) - len(successful)
    assert len(released) == counter.oom_errors


def test_split_counts_exact():
    ids, mask = batch(10)
    counter = SplitCounter()
    embed_with_oom_split(OomAbove(3), ids, mask, on_oom=None, counter=counter)
    # 10 -> (5, 5); each 5 -> (2, 3): three splits
    assert (counter.splits, counter.oom_errors) == (3, 3)
    counter2 = SplitCounter()
    embed_with_oom_split(OomAbove(100), ids, mask, on_oom=None, counter=counter2)
    assert (counter2.splits, counter2.oom_errors) == (0, 0)


def test_runtime_error_out_of_memory_also_splits():
    ids, mask = batch(9)
    got = embed_with_oom_split(OomAbove(2, error=RuntimeError), ids, mask, on_oom=None)
    np.testing.assert_array_equal(got, reference(ids, mask))


def test_single_row_oom_is_a_clear_error():
    ids, mask = batch(4)
    counter = SplitCounter()
    with pytest.raises(OomSplitError, match="single row of length 24") as info:
        embed_with_oom_split(OomAbove(0), ids, mask, on_oom=None, counter=counter)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    # 4 rows OOM -> split; 2 rows OOM -> split; the first single row OOMs -> error
    assert (counter.splits, counter.oom_errors) == (2, 3)


def test_other_errors_pass_through_unchanged():
    def broken(ids, mask):
        raise ValueError("bad token id 99999 (expected < 30522)")

    ids, mask = batch(8)
    with pytest.raises(ValueError, match="bad token id"):
        embed_with_oom_split(broken, ids, mask, on_oom=None)


def test_is_cuda_oom():
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_cuda_oom(RuntimeError("CUDA error: out of memory"))
    assert is_cuda_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_cuda_oom(RuntimeError("shape mismatch"))
    assert not is_cuda_oom(MemoryError())


def test_shape_errors():
    ids, mask = batch(4)
    with pytest.raises(ValueError, match="equal"):
        embed_with_oom_split(reference, ids, mask[:, :5])
    with pytest.raises(ValueError, match="empty"):
        embed_with_oom_split(reference, ids[:0], mask[:0])
