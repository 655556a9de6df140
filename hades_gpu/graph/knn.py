"""Cosine k-nearest-neighbour edges between chunk embeddings, computed in blocks.

The similarity matrix of N chunks is N x N: at 1e6 chunks that is 4 TB in float32, so it never
exists. Rows are taken `block_size` at a time, and for each row block the columns are scanned
`block_size` at a time too, keeping a running top-k (peak memory: one (B, B) similarity block plus
the (B, k) running best). The same code runs on CUDA and on the CPU; float32 matmuls run at full
fp32 precision (TF32 is switched off for the call) and ties are broken by the smaller node index, so
both devices return the same neighbours.

Ties: `torch.topk` is not stable (which of several equal values it keeps differs by device and
version), so the top-k is taken over one int64 key per candidate that orders by similarity first and
by smaller index second: the float32's bits mapped to an order-preserving int32, times 2^32, plus
``2^32 - 1 - index``. The key is exact (no rounding), so duplicates of a vector always keep the
lowest-numbered neighbours.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


_INDEX_SPAN = 1 << 32  # indices below 2^32 fit the low half of the tie-break key


def _ordered_int32(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (IEEE-754: flip the magnitude bits of negatives)."""
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _topk_by_value_then_index(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the `k` largest `values`, ties to the smaller `index` (>= 0; -1 = empty slot).

    Shapes:
        values: float32 (B, C), index: int64 (B, C) -> (B, k) values, (B, k) indices, best first
    """
    low = torch.where(index >= 0, (_INDEX_SPAN - 1) - index, torch.zeros_like(index))  # (B, C)
    key = _ordered_int32(values).to(torch.int64) * _INDEX_SPAN + low  # (B, C): exact in int64
    _, pos = torch.topk(key, k, dim=1)  # keys are distinct: the result does not depend on topk's order
    return torch.gather(values, 1, pos), torch.gather(index, 1, pos)


@torch.no_grad()
def knn_blocked(
    embeddings: np.ndarray | torch.Tensor,
    k: int,
    threshold: float,
    block_size: int = 4096,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Top-`k` cosine neighbours of every row, self excluded, similarity >= `threshold`.

    .. math::
        s_{ij} = \frac{x_i^\top x_j}{\lVert x_i\rVert\,\lVert x_j\rVert}, \qquad
        \mathrm{kNN}(i) = \operatorname{top\text{-}k}_{j \ne i} s_{ij}

    Rows with a zero vector (missing embedding) get no neighbours and are nobody's neighbour.

    Args:
        embeddings (np.ndarray or torch.Tensor): float (N, D).
        k (int): neighbours per row (capped at N - 1).
        threshold (float): minimum cosine similarity kept.
        block_size (int, optional): rows (and columns) per block. (default: :obj:`4096`)
        device (torch.device or str, optional): where the blocks are multiplied. (default: cpu)

    Returns:
        (src, dst, sim): int64 (M,), int64 (M,), float32 (M,), sorted by src, then by similarity
        descending, then by dst ascending.

    Shapes:
        - **input:** (N, D)
        - **output:** three arrays of length M <= N * k
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    if x.dim() != 2:
        raise ValueError(f"embeddings must be two-dimensional (got {x.dim()} dimensions)")
    n = x.shape[0]
    k = min(k, n - 1)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2 or k < 1:
        return empty
    if n >= _INDEX_SPAN:
        raise ValueError(f"knn_blocked handles fewer than 2^32 rows (got {n})")
    device = torch.device(device)
    x = x.to(device)
    norms = x.norm(dim=1, keepdim=True)  # (N, 1)
    valid = norms.squeeze(1) > 0
    x = torch.where(valid[:, None], x / norms.clamp_min(1e-12), torch.zeros_like(x))
    neg_inf = torch.tensor(float("-inf"), device=device)
    srcs, dsts, sims = [], [], []
    with _full_fp32_matmul():
        for r0 in range(0, n, block_size):
            r1 = min(r0 + block_size, n)
            q = x[r0:r1]  # (B, D)
            best_v = torch.full((r1 - r0, k), float("-inf"), device=device)  # (B, k) running top-k
            best_i = torch.full((r1 - r0, k), -1, dtype=torch.long, device=device)
            rows = torch.arange(r0, r1, device=device)
            for c0 in range(0, n, block_size):
                c1 = min(c0 + block_size, n)
                s = q @ x[c0:c1].T  # (B, C)
                cols = torch.arange(c0, c1, device=device)
                s = torch.where(rows[:, None] == cols[None, :], neg_inf, s)  # exclude self
                s = torch.where(valid[c0:c1][None, :], s, neg_inf)  # zero vectors are no neighbours
                cand_v = torch.cat([best_v, s], dim=1)  # (B, k + C)
                cand_i = torch.cat([best_i, cols.expand(r1 - r0, -1)], dim=1)
                kk = min(k, cand_v.shape[1])
                best_v, best_i = _topk_by_value_then_index(cand_v, cand_i, kk)
            keep = (best_v >= threshold) & valid[r0:r1, None] & (best_i >= 0)
            src = rows[:, None].expand_as(best_i)[keep]
            # device -> host copy: the CPU waits for this block's matmuls here (sync point)
            srcs.append(src.cpu())
            dsts.append(best_i[keep].cpu())
            sims.append(best_v[keep].float().cpu())
    src = torch.cat(srcs).numpy().astype(np.int64)
    dst = torch.cat(dsts).numpy().astype(np.int64)
    sim = torch.cat(sims).numpy().astype(np.float32)
    # deterministic order and tie-break: by src, similarity descending, dst ascending
    order = np.lexsort((dst, -sim, src))
    return src[order], dst[order], sim[order]


def knn_brute_force(embeddings: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference in numpy float64 on the full similarity matrix (tests only; O(N^2) memory)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    k = min(k, n - 1)
    norms = np.linalg.norm(x, axis=1)
    valid = norms > 0
    xn = np.where(valid[:, None], x / np.maximum(norms, 1e-12)[:, None], 0.0)
    s = xn @ xn.T
    s[np.arange(n), np.arange(n)] = -np.inf
    s[:, ~valid] = -np.inf
    srcs, dsts, sims = [], [], []
    for i in range(n):
        if not valid[i]:
            continue
        order = np.lexsort((np.arange(n), -s[i]))[:k]
        for j in order:
            if s[i, j] >= threshold:
                srcs.append(i)
                dsts.append(j)
                sims.append(s[i, j])
    return np.array(srcs, np.int64), np.array(dsts, np.int64), np.array(sims, np.float32)
