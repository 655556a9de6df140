"""Optimizers for a large embedding table whose gradient touches a few rows per step.

Both take a sparse COO gradient whose indices are rows (as `hades_gpu.isne.model` produces: sorted,
unique) and update only those rows, with row gathers and scatters:

- `RowSparseAdam`: `torch.optim.SparseAdam`'s lazy Adam, two (N, d) moment tables.
- `RowwiseAdagrad`: PyTorch-BigGraph's row-wise Adagrad (Lerer et al., 2019; FBGEMM's
  ``rowwise_adagrad``): one accumulated squared-gradient *scalar* per row. Each step then moves
  one (R, d) block of θ and R scalars instead of θ plus two (R, d) moment blocks: on a 1e6-node
  graph, where a step touches ~5e5 random rows of 256 B, that is the difference between the
  optimizer dominating the step and not (measured in `scripts/bench_isne.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rows_strictly_increasing(rows: Tensor) -> bool:
    """True when a sparse gradient's row indices are sorted and unique, i.e. it is coalesced.

    Autograd drops the coalesced flag when it stores a sparse gradient it cannot steal
    (`AccumulateGrad` rebuilds it with `_sparse_coo_tensor_unsafe`), so the flag alone would make
    every step sort R rows of d values again (0.13 s of a CPU step at 1e6 nodes); one O(R) check
    instead.
    """
    return rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())



def _row_gradient(p: Tensor, rows_unique: bool = False) -> tuple[Tensor, Tensor] | None:
    """(rows (R,), values (R, d)) of a parameter's sparse row gradient; None when it has none.

    ``rows_unique=True`` trusts the producer (`hades_gpu.isne.model` emits sorted, unique rows and
    the trainer clears gradients every step): no check, so no device sync per step on CUDA.
    """
    if p.grad is None:
        return None
    g = p.grad
    if not g.is_sparse:
        raise ValueError("a row-sparse optimizer needs sparse gradients (got a dense one); use optimizer=adam")
    if not rows_unique and not g.is_coalesced() and not rows_strictly_increasing(g._indices()[0]):
        g = g.coalesce()
    rows, vals = g._indices()[0], g._values()
    return (rows, vals) if rows.numel() else None


class RowSparseAdam(torch.optim.Optimizer):
    r"""`torch.optim.SparseAdam`'s update (lazy Adam: rows without a gradient keep their parameters
    and moments), done with row gathers and scatters.

    The gradient must be a sparse COO tensor whose indices are rows (as `ISNE.embed` produces:
    sorted, unique, flagged coalesced). Per row r with gradient g (t = step count):

    .. math::
        m_r \leftarrow eta_1 m_r + (1-eta_1) g, \quad v_r \leftarrow eta_2 v_r + (1-eta_2) g^2,
        \quad 	heta_r \leftarrow 	heta_r - \eta rac{\sqrt{1-eta_2^t}}{1-eta_1^t}
              rac{m_r}{\sqrt{v_r} + \epsilon}

    exactly as SparseAdam. Why not SparseAdam itself: on a 1e6-node graph its sparse_mask / sparse
    add_ / coalesce path took 2.2 s of a 3.9 s CPU step; this takes a fraction of that.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 rows_unique: bool = False) -> None:
        if not 0.0 < lr:
            raise ValueError(f"lr must be > 0 (got {lr})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.rows_unique = rows_unique

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                rg = _row_gradient(p, self.rows_unique)
                if rg is None:
                    continue
                rows, vals = rg  # (R,), (R, d)
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                m = st["exp_avg"].index_select(0, rows).mul_(b1).add_(vals, alpha=1 - b1)  # (R, d)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(vals, vals, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                # scaled first: index_add_ with alpha takes a slow path on the CPU (~2.6x at 2.4e5 rows)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)).mul_(-step_size))
        return None




class RowwiseAdagrad(torch.optim.Optimizer):
    r"""Row-wise Adagrad (PyTorch-BigGraph): one squared-gradient accumulator per row.

    Per row r with gradient g (d values):

    .. math::
        G_r \leftarrow G_r + \tfrac{1}{d}\lVert g\rVert^2, \qquad
        \theta_r \leftarrow \theta_r - \eta \frac{g}{\sqrt{G_r} + \epsilon}

    Rows without a gradient keep θ and G (lazy, like SparseAdam).
    """

    def __init__(self, params, lr: float = 0.1, eps: float = 1e-10, rows_unique: bool = False) -> None:
        if not 0.0 < lr:
            raise ValueError(f"lr must be > 0 (got {lr})")
        super().__init__(params, dict(lr=lr, eps=eps))
        self.rows_unique = rows_unique

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                rg = _row_gradient(p, self.rows_unique)
                if rg is None:
                    continue
                rows, vals = rg
                st = self.state[p]
                if not st:
                    st["sum_sq"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                # no (R, d) temporaries: a fresh 100+ MB block per step costs its page faults again
                mean_sq = torch.linalg.vector_norm(vals, dim=1, dtype=torch.float32).pow_(2).div_(vals.shape[1])
                acc = st["sum_sq"].index_select(0, rows).add_(mean_sq)  # (R,)
                st["sum_sq"].index_copy_(0, rows, acc)
                step = acc.sqrt_().add_(eps).reciprocal_().mul_(-lr).to(vals.dtype)  # (R,)
                p.index_add_(0, rows, vals.mul_(step[:, None]))  # the gradient is consumed in place
        return None
