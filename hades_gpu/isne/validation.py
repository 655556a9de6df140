"""What the trainer watches after each epoch, and when it stops.

Two signals, chosen by `isne.early_stop`:

- ``walk_loss`` (default): the skip-gram loss of a *fixed* set of validation walks and negatives
  (drawn once, from the training graph, with their own seed), scored with exact h() (all
  neighbours, no sampling). The same pairs every epoch, so a change is the model's, not sampling
  noise. It measures convergence of the training objective, and it moves on any graph. Why it is
  the default: held-out *edges* (below) tell nothing on a sparse graph: once the edge is removed
  its two ends are usually more than a context window apart, so link AUC sits at ~0.51 on a
  20k-node planted partition while k-NN accuracy climbs from 0.44 to 0.65 (scripts/eval_isne.py),
  and stopping on it stops at a random epoch.
- ``link_auc``: P(h(u)·h(v) of a held-out edge > that of a random pair); meaningful on dense graphs
  (the chunk graph with its kNN edges). Held-out edges are also reported under ``walk_loss``.
- ``off``: run every epoch (or until the time budget).

`EarlyStopper` stops after `patience` epochs without an improvement of more than `min_delta`
(relative for the walk loss, absolute for the AUC) and remembers the best epoch, whose θ the
trainer restores.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hades_gpu.config import EarlyStopMetric, IsneConfig
from hades_gpu.isne.model import ISNE
from hades_gpu.isne.sampling import CSRGraph, random_walks


def link_auc(pos: Tensor, neg: Tensor) -> float:
    """Mann–Whitney AUC: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = pos.double().cpu(), neg.double().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos, neg])
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    if uniq.numel() < scores.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
        ranks = (sums / counts)[inv]
    n_p, n_n = pos.numel(), neg.numel()
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


@torch.no_grad()
def validation_auc(model: ISNE, csr: CSRGraph, split: EdgeSplit) -> float:
    dev = csr.device
    pos, neg = split.val_pos.to(dev), split.val_neg.to(dev)
    nodes, inv = torch.unique(torch.cat([pos.reshape(-1), neg.reshape(-1)]), return_inverse=True)
    h = model.embed(nodes, csr, fanout=None).float()  # exact h() on the training graph
    hp = h[inv[: pos.numel()]].view(2, -1, h.shape[1])
    hn = h[inv[pos.numel():]].view(2, -1, h.shape[1])
    return link_auc((hp[0] * hp[1]).sum(-1), (hn[0] * hn[1]).sum(-1))


def fixed_validation_walks(csr: CSRGraph, starts: Tensor, cfg: IsneConfig) -> tuple[Tensor, Tensor]:
    """`cfg.val_walks` walks and their negatives, drawn once (seed `cfg.seed + 1`): (W, L), (K*W, L)."""
    dev = csr.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed + 1)
    n = min(cfg.val_walks, starts.numel())
    first = starts[torch.randperm(starts.numel(), generator=gen, device=dev)[:n]]
    walks = random_walks(csr, first, cfg.walk_length, gen)
    neg = starts[torch.randint(starts.numel(), (cfg.num_negatives * n, cfg.walk_length), generator=gen, device=dev)]
    return walks, neg


@torch.no_grad()
def validation_walk_loss(model: ISNE, csr: CSRGraph, walks: tuple[Tensor, Tensor], cfg: IsneConfig) -> float:
    """Skip-gram loss of the fixed validation walks with exact h() (fanout = all neighbours)."""
    loss, _ = model.loss(walks[0], walks[1], csr, cfg.context_size, fanout=None)
    return float(loss)


class EarlyStopper:
    """Tracks the chosen validation signal; `update` says whether the epoch is the best so far."""

    def __init__(self, cfg: IsneConfig, has_val_edges: bool) -> None:
        metric = EarlyStopMetric(cfg.early_stop)
        if metric == EarlyStopMetric.LINK_AUC and not has_val_edges:
            metric = EarlyStopMetric.OFF  # nothing held out (val_fraction 0 or a tiny graph)
        self.metric = metric
        self.patience = cfg.patience
        self.min_delta = cfg.min_delta
        self.best: Optional[float] = None
        self.bad = 0

    def update(self, epoch: int, rec: dict) -> bool:
        if self.metric == EarlyStopMetric.OFF:
            return True  # the last epoch is the model
        if self.metric == EarlyStopMetric.WALK_LOSS:
            value = rec["val_walk_loss"]
            better = self.best is None or value < self.best - self.min_delta * abs(self.best)
        else:
            value = rec["val_auc"]
            better = self.best is None or (not math.isnan(value) and value > self.best + self.min_delta)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return better

    def should_stop(self) -> bool:
        return self.metric != EarlyStopMetric.OFF and self.bad >= self.patience
