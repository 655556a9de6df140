"""ISNE quality on planted-partition graphs, with the protocol of Kiss & Szűcs (2024).

A stochastic block model graph (default 20,000 nodes in 10 communities, mean degree 10, noisy: half
of a node's edges leave its community) is embedded three ways with the same trainer, loss, walks and
number of epochs (`hades_gpu.isne.evaluation.evaluate`):

- ISNE (h(v) = mean of neighbours' θ), transductive;
- lookup-table Node2Vec (h(v) = θ_v): the same trainer with the neighbour mean switched off;
- ISNE trained with `--heldout` of the nodes removed, their vectors then inferred from their
  neighbours' θ; held-out accuracy (classified against the training nodes) / training-node accuracy.

Accuracy: k = 15 nearest neighbours by dot product, majority vote, 5-fold cross-validation.

Early stopping is off by default here (`--early-stop off`), so both models get the same fixed
number of epochs. (On a sparse SBM the two ends of a held-out edge are usually > 4 hops apart once
the edge is gone, so held-out link AUC stays at ~0.51 while classification accuracy still climbs —
measured: AUC 0.507-0.509 over 16 epochs at 20k nodes, accuracy 0.44 -> 0.65 — which is why the
trainer's default signal is the fixed-walk validation loss, `isne.early_stop=walk_loss`.)

    python scripts/eval_isne.py --out eval.json          # full size (minutes on a CPU)
    python scripts/eval_isne.py --small                  # 4,000 nodes, 10 epochs: < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


from hades_gpu.config import IsneConfig
from hades_gpu.isne.evaluation import EvalReport, evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="4,000 nodes, 10 epochs, batch 256: < 60 s")
    p.add_argument("--nodes", type=int, default=20000)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--deg-in", type=float, default=5.0, help="expected neighbours inside the community")
    p.add_argument("--deg-out", type=float, default=5.0, help="expected neighbours outside it")
    p.add_argument("--epochs", type=int, default=None, help="default 30; --small: 10")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out edges (link AUC; 0: none)")
    p.add_argument("--early-stop", default="off", help="isne.early_stop: off (same epochs for every model) | "
                   "walk_loss | link_auc")
    p.add_argument("--optimizer", default=None, help="default: isne.optimizer")
    p.add_argument("--batch-size", type=int, default=None, help="default: isne.batch_size; --small: 128")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--fanout", type=int, default=None, help="default: isne.fanout")
    p.add_argument("--infer-rounds", type=int, default=None, help="default: isne.infer_rounds")
    p.add_argument("--heldout", type=float, default=0.15, help="fraction of nodes removed for the inductive test")
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.small:
        args.nodes = 4000 if args.nodes == 20000 else args.nodes
        args.epochs = args.epochs or 10
        args.batch_size = args.batch_size or 256
    args.epochs = args.epochs or 30
    return args


def table(r: EvalReport) -> str:
    rows = [
        ("graph", f"SBM {r.nodes:,} nodes, {r.edges:,} edges, {r.blocks} blocks, p_in={r.p_in:.2e}, p_out={r.p_out:.2e}"),
        ("ISNE accuracy (15-NN, 5-fold)", f"{r.isne_acc:.3f}  ({r.isne_epochs} epochs, {r.isne_seconds:.1f} s)"),
        ("Node2Vec accuracy (same loss/walks/budget)", f"{r.node2vec_acc:.3f}  ({r.node2vec_epochs} epochs, {r.node2vec_seconds:.1f} s)"),
        (f"ISNE inductive: training nodes ({1 - r.heldout_fraction:.0%})", f"{r.inductive_train_acc:.3f}"),
        (f"ISNE inductive: held-out nodes ({r.heldout_fraction:.0%})", f"{r.inductive_heldout_acc:.3f}"),
        ("held-out / training accuracy", f"{r.inductive_ratio:.3f}  (isne.infer_rounds={r.config.get('infer_rounds')})"),
        ("held-out / training, trained neighbours only", f"{r.inductive_ratio_plain:.3f}  (infer_rounds=0, the paper's)"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a.ljust(w)} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = IsneConfig(device=args.device, seed=args.seed, val_fraction=args.val_fraction, early_stop=args.early_stop,
                     time_budget_vs_embedding=0.0)
    for name in ("epochs", "batch_size", "lr", "dim", "fanout", "optimizer", "infer_rounds"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    per_block = args.nodes / args.blocks
    p_in = args.deg_in / max(per_block - 1, 1)
    p_out = args.deg_out / max(args.nodes - per_block, 1)
    t = time.perf_counter()
    report = evaluate(n=args.nodes, blocks=args.blocks, p_in=p_in, p_out=p_out, cfg=cfg,
                      heldout_fraction=args.heldout, k=args.k, folds=args.folds, seed=args.seed,
                      device=None if args.device == "auto" else args.device)
    print(table(report))
    print(f"total {time.perf_counter() - t:.1f} s, torch threads {torch.get_num_threads()}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report.as_dict(), "threads": torch.get_num_threads()}, indent=2))
    return 0
