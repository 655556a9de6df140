"""ISNE training throughput and peak memory at growing graph sizes.

For each size a fresh child process (so peak memory is its own) builds a random graph (stochastic
block model, mean degree `--degree`), warms up on 2 mini-batches, then trains `--epochs` epoch(s)
of the default ISNE config (optionally cut to `--max-batches` batches per epoch; the epoch time is
then extrapolated from the measured batches). Validation is off: only optimisation is timed, and
the timed region ends with a device synchronisation (the trainer reads the epoch loss).

Reported per size: nodes, undirected edges, positive pairs/s, seconds per epoch, seconds per epoch
per million edges (flat when cost grows linearly in edges), the work of one step (distinct θ rows
gathered for the batch's h(); bounded by batch positions x fanout whatever N is, but smaller on
small graphs, where a batch meets the same nodes again), seconds per step and per 1,000 θ rows, peak
RSS of the child (graph generation included) and during training, and
`torch.cuda.max_memory_allocated` on a GPU.

    python scripts/bench_isne.py --sizes 1e4,1e5,1e6 --out bench.json
    python scripts/bench_isne.py --sizes 1e4,1e5 --max-batches 20       # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path



def _child(args: argparse.Namespace) -> dict:
    import psutil
    import torch

    from hades_gpu.config import IsneConfig
    from hades_gpu.gpu.device import select_device
    from hades_gpu.isne.evaluation import sbm_graph
    from hades_gpu.isne.trainer import EdgeSplit, train_isne

    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(float(args.child))
    dev = select_device(args.device)
    t = time.perf_counter()
    blocks = 10
    per_block = n / blocks
    p_in = (args.degree / 2) / max(per_block - 1, 1)
    p_out = (args.degree / 2) / max(n - per_block, 1)
    ei, _ = sbm_graph(n, blocks, p_in, p_out, seed=0)
    gen_s = time.perf_counter() - t
    empty = torch.zeros(2, 0, dtype=torch.long)
    split = EdgeSplit(ei, empty, empty)  # no validation: time the optimisation only
    cfg = IsneConfig(device=str(dev), val_fraction=0.0, early_stop="off", time_budget_vs_embedding=0.0)
    for key in ("batch_size", "fanout"):  # isne.* overrides given on the command line
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))

    train_isne(ei, n, cfg, epochs=1, max_batches_per_epoch=2, split=split)  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)

    proc = psutil.Process()
    peak = {"rss": proc.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss_before = proc.memory_info().rss
    res = train_isne(ei, n, cfg, epochs=args.epochs, max_batches_per_epoch=args.max_batches, split=split)
    stop.set()
    sampler.join()

    # work per step: distinct nodes needing h() and distinct θ rows gathered (one sample batch)
    from hades_gpu.isne.sampling import CSRGraph, random_walks, sample_neighbors
    from hades_gpu.isne.trainer import draw_negatives

    csr = CSRGraph.from_edge_index(ei, n, device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    start = torch.randint(n, (cfg.batch_size,), generator=g, device=dev).repeat(cfg.walks_per_node)
    walks = random_walks(csr, start, cfg.walk_length, g)
    negs = draw_negatives(torch.arange(n, device=dev), (cfg.num_negatives * walks.shape[0], cfg.walk_length),
                          cfg.negative_pool, g)
    uniq = torch.unique(torch.cat([walks.reshape(-1), negs.reshape(-1)]).clamp_min(0))
    nbrs, _, _ = sample_neighbors(csr, uniq, cfg.fanout, g)
    theta_rows = int(torch.unique(nbrs).numel())

    n_starts = int((torch.bincount(ei[0], minlength=n) > 0).sum())
    full_batches = -(-n_starts // cfg.batch_size)
    run_batches = min(full_batches, args.max_batches or full_batches)
    sec_per_epoch_measured = res.train_seconds / max(res.epochs_run, 1)
    sec_per_epoch = sec_per_epoch_measured * full_batches / run_batches
    edges = ei.shape[1] // 2
    return {
        "nodes": n,
        "edges": edges,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "fanout": cfg.fanout,
        "optimizer": str(cfg.optimizer),
        "negative_pool": cfg.negative_pool,
        "batches_per_epoch": full_batches,
        "batches_timed_per_epoch": run_batches,
        "epochs": res.epochs_run,
        "pos_pairs": res.pos_pairs,
        "train_seconds": res.train_seconds,
        "pairs_per_s": res.pairs_per_s,
        "epoch_seconds": sec_per_epoch,
        "epoch_extrapolated": run_batches < full_batches,
        "epoch_seconds_per_1e6_edges": sec_per_epoch / edges * 1e6,
        "nodes_per_step": int(uniq.numel()),
        "neighbour_slots_per_step": int(nbrs.numel()),
        "theta_rows_per_step": theta_rows,
        "step_seconds": res.train_seconds / max(res.epochs_run * run_batches, 1),
        "graph_gen_seconds": gen_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_before_mb": rss_before / 2**20,
        "train_peak_rss_mb": peak["rss"] / 2**20,
        "cuda_max_allocated_mb": (res.peak_device_bytes or 0) / 2**20 if dev.type == "cuda" else None,
    }


def table(rows: list[dict]) -> str:
    head = ("nodes", "edges", "device", "pairs/s", "s/epoch", "s/epoch per 1e6 edges", "θ rows/step",
            "s/step", "µs per 1k θ rows", "peak RSS MB", "train peak RSS MB", "GPU max alloc MB")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gpu = f"{r['cuda_max_allocated_mb']:.0f}" if r.get("cuda_max_allocated_mb") is not None else "-"
        ep = f"{r['epoch_seconds']:.1f}" + (" (extrap.)" if r["epoch_extrapolated"] else "")
        out.append(f"| {r['nodes']:,} | {r['edges']:,} | {r['device']} | {r['pairs_per_s']:,.0f} | {ep} | "
                   f"{r['epoch_seconds_per_1e6_edges']:.1f} | {r['theta_rows_per_step']:,} | "
                   f"{r['step_seconds']:.3f} | {r['step_seconds'] / r['theta_rows_per_step'] * 1e9:.0f} | "
                   f"{r['peak_rss_mb']:.0f} | "
                   f"{r['train_peak_rss_mb']:.0f} | {gpu} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated node counts")
    p.add_argument("--degree", type=float, default=10.0, help="mean degree of the random graphs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None, help="batches timed per epoch (extrapolate the rest)")
    p.add_argument("--batch-size", type=int, default=None, help="default: isne.batch_size")
    p.add_argument("--fanout", type=int, default=None, help="default: isne.fanout")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, "-m", "hades_gpu.benchmarks.isne_bench", "--child", size.strip(), "--degree", str(args.degree),
               "--epochs", str(args.epochs), "--device", args.device, "--threads", str(args.threads)]
        if args.max_batches:
            cmd += ["--max-batches", str(args.max_batches)]
        for key in ("batch_size", "fanout"):
            if getattr(args, key):
                cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"size {size} failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"size {size}: {rows[-1]['pairs_per_s']:,.0f} pairs/s", file=sys.stderr, flush=True)
    print(table(rows))
    by_size = {r["nodes"]: r for r in rows}
    summary = {}
    if 10**5 in by_size and 10**6 in by_size:
        summary["epoch_ratio_1e6_to_1e5"] = by_size[10**6]["epoch_seconds"] / by_size[10**5]["epoch_seconds"]
        summary["pairs_per_s_1e6"] = by_size[10**6]["pairs_per_s"]
        print(f"\ns/epoch at 1e6 nodes / at 1e5: {summary['epoch_ratio_1e6_to_1e5']:.1f}x (target <= 12x); "
              f"positive pairs/s at 1e6: {summary['pairs_per_s_1e6']:,.0f} (target >= 1,000,000)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sizes": rows, "summary": summary}, indent=2))
    return 0



if __name__ == "__main__":  # the --child runs: python -m hades_gpu.benchmarks.isne_bench
    sys.exit(main())
