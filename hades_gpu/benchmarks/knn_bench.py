"""kNN edges at scale: the approximate FAISS index (graph/ann.py) against exact blocked search.

Per size: the ANN kNN graph (k=15 by default) built AND queried for every row (train, add, recall
tuning on a 1000-row sample against exact search, all-rows search), its measured recall@k and nprobe;
exact blocked search (`graph.knn.knn_blocked`) timed at the sizes in `--exact-sizes` and extrapolated
as O(N^2) to the others (labelled ``extrapolated``). Vectors are SYNTHETIC (`synthetic_chunk_embeddings`,
calibrated on real MiniLM chunks) unless `--real-output` names an ingest output, whose real MiniLM
embeddings get the same row. Each run updates the rows of `--out` (keyed by data and size), so sizes
can be measured in separate runs.

    python scripts/bench_knn.py --sizes 1e5 --exact-sizes 1e5 --real-output OUT --out docs/bench_knn.json
    python scripts/bench_knn.py --sizes 1e6 --exact-sizes "" --out docs/bench_knn.json

`knn_section` is the part `hades-bench bench=graph` calls (the ISNE rows of that job are separate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

SYNTHETIC = "SYNTHETIC (3-level Gaussian mixture on the unit sphere, calibrated on MiniLM)"


def synthetic_chunk_embeddings(n: int, dim: int = 384, seed: int = 0, doc_size: int = 16, docs_per_topic: int = 10,
                               global_weight: float = 0.57, topic_weight: float = 0.22,
                               doc_weight: tuple[float, float] = (0.57, 0.96),
                               noise: tuple[float, float] = (0.31, 1.17)) -> np.ndarray:
    """SYNTHETIC stand-in for MiniLM chunk embeddings: unit vectors from a three-level Gaussian mixture.

    x = normalise(global_weight g + topic_weight t_topic + w d_doc + s z / sqrt(dim)): one shared
    direction g (MiniLM vectors are anisotropic: a random pair has cosine ~0.25), a topic centre per
    `docs_per_topic` documents, a document centre per `doc_size` chunks, and per-chunk weights
    w ~ U(doc_weight), s ~ U(noise). The defaults were fitted (random search) so that at 3,386 chunks
    the nearest-neighbour cosines match real MiniLM embeddings of 3,386 stdlib-Python chunks: median
    1st/5th/10th/15th neighbour 0.75/0.68/0.61/0.49 (real 0.76/0.66/0.62/0.60), 1st neighbour
    10th-90th percentile 0.62-0.87 (real 0.65-0.86), mean pair cosine 0.22 (real 0.25). Documents and
    topics grow with n, so the neighbourhood density stays that of the calibration.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(dim)
    g /= np.linalg.norm(g)
    n_docs = max(1, n // doc_size)
    n_topics = max(1, n_docs // docs_per_topic)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    topic_of = rng.integers(0, n_topics, n_docs)
    doc_of = rng.integers(0, n_docs, n)
    w = rng.uniform(*doc_weight, n).astype(np.float32)
    s = rng.uniform(*noise, n).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    block = 65536
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        dd = doc_of[r0:r1]
        z = rng.standard_normal((r1 - r0, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        v = (global_weight * g).astype(np.float32) + topic_weight * topics[topic_of[dd]] + w[r0:r1, None] * docs[dd] \
            + s[r0:r1, None] * z
        x[r0:r1] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x


def ann_row(x: np.ndarray, k: int, data: str, cfg: Optional[Any] = None) -> dict[str, Any]:
    """Build + tune + query-all of the ANN kNN graph on `x` (edges at `cfg.knn_threshold`, as the
    pipeline builds them); its timings, recall@k and the recall of the edges."""
    from hades_gpu.graph.ann import knn_ann, open_or_build

    cfg = cfg or bench_graph_config(k, 0, None)
    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    t = time.perf_counter()
    idx = open_or_build(ids, x, k, cfg, None)
    src, _, _ = knn_ann(idx, x, k, cfg.knn_threshold, cfg)
    total = time.perf_counter() - t
    info = idx.info
    return {"data": data, "method": "ann", "n": int(len(x)), "dim": int(x.shape[1]), "k": int(k),
            "index_type": info.index_type, "nlist": info.nlist, "nprobe": info.nprobe, "refine_factor": info.refine_factor,
            "recall_at_k": info.recall_at_k, "recall_sample": info.recall_sample, "target_met": info.target_met,
            "threshold": info.threshold, "edge_recall": info.edge_recall, "edge_nprobe": info.edge_nprobe,
            "edge_refine_factor": info.edge_refine_factor, "edge_target_met": info.edge_target_met,
            "lists_recall_at_k": info.lists_recall_at_k, "join_rounds": info.join_rounds,
            "threads": info.threads, "seconds": dict(info.seconds), "total_s": total, "edges": int(len(src)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def nprobe_sweep(x: np.ndarray, k: int, data: str, cfg: Any, nprobes: list[int], refine_factors: list[int],
                 timed_queries: int = 20000) -> list[dict[str, Any]]:
    """Recall@k and the edges' recall at each (refine, nprobe) on one built index, with the all-rows
    search time EXTRAPOLATED from `timed_queries` random rows (labelled): what each setting would cost
    where running every setting on every row would take hours."""
    from hades_gpu.graph.ann import AnnIndex, normalise, recall_reference

    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    t = time.perf_counter()
    idx = AnnIndex.build(ids, x, cfg)
    build_s = time.perf_counter() - t
    xn, valid = normalise(x)
    sample, top_sims, top_ids = recall_reference(xn, valid, k, cfg)  # the rows and reference `tune` uses
    rng = np.random.default_rng(cfg.knn_seed + 2)
    timed = xn[rng.choice(len(xn), size=min(timed_queries, len(xn)), replace=False)]
    rows = []
    for refine in refine_factors:
        for nprobe in nprobes:
            if nprobe > idx.nlist:
                continue
            idx.nprobe, idx.refine_factor = nprobe, refine
            recall, edge_recall = idx.recalls_against(xn, sample, top_sims, top_ids, cfg.knn_threshold)
            t = time.perf_counter()
            idx.search(timed, k + 1)
            per_query = (time.perf_counter() - t) / len(timed)
            rows.append({"data": data, "n": int(len(x)), "k": int(k), "index_type": idx.info.index_type,
                         "nlist": idx.nlist, "nprobe": idx.nprobe, "refine_factor": idx.refine_factor,
                         "threshold": float(cfg.knn_threshold), "recall_at_k": recall, "edge_recall": edge_recall,
                         "recall_sample": int(len(sample)), "build_s": build_s, "timed_queries": int(len(timed)),
                         "all_rows_search_s_extrapolated": per_query * len(x), "threads": idx.info.threads})
    return rows


def exact_row(x: np.ndarray, k: int, data: str, block_size: int = 4096) -> dict[str, Any]:
    """Exact blocked kNN (the baseline) on `x`, timed."""
    from hades_gpu.graph.knn import knn_blocked

    t = time.perf_counter()
    src, _, _ = knn_blocked(x, k, -1.0, block_size)
    return {"data": data, "method": "exact", "n": int(len(x)), "dim": int(x.shape[1]), "k": int(k),
            "total_s": time.perf_counter() - t, "edges": int(len(src)), "extrapolated": False}


def extrapolate_exact(rows: list[dict[str, Any]], sizes: list[int], dim: int, k: int) -> list[dict[str, Any]]:
    """Exact seconds at `sizes` from the largest measured synthetic exact row, as O(N^2) (labelled)."""
    measured = [r for r in rows if r["method"] == "exact" and not r.get("extrapolated") and r["data"] == SYNTHETIC]
    if not measured:
        return []
    base = max(measured, key=lambda r: r["n"])
    have = {r["n"] for r in measured}
    return [{"data": SYNTHETIC, "method": "exact", "n": n, "dim": dim, "k": k, "extrapolated": True,
             "total_s": base["total_s"] * (n / base["n"]) ** 2, "extrapolated_from_n": base["n"]}
            for n in sizes if n not in have]


def bench_graph_config(k: int, threads: int, threshold: Optional[float]) -> Any:
    """The graph config of the benchmark's ANN rows: ANN forced, `threshold` or the pipeline's default."""
    from hades_gpu.config import GraphConfig

    return GraphConfig(knn_k=k, knn_exact_max_nodes=0, knn_threads=threads,
                       knn_threshold=GraphConfig.knn_threshold if threshold is None else float(threshold))


def knn_section(sizes: list[int], exact_sizes: list[int], dim: int = 384, k: int = 15,
                real: Optional[np.ndarray] = None, threads: int = 0,
                threshold: Optional[float] = None) -> list[dict[str, Any]]:
    """The kNN rows of the graph benchmark: ANN (and exact where asked) per synthetic size, plus real."""
    cfg = bench_graph_config(k, threads, threshold)
    rows: list[dict[str, Any]] = []
    if real is not None and len(real) > 1:
        real_label = f"real MiniLM chunk embeddings ({len(real)} chunks)"
        rows.append(ann_row(real, k, real_label, cfg))
        rows.append(exact_row(real, k, real_label))
    for n in sizes:
        x = synthetic_chunk_embeddings(n, dim)
        rows.append(ann_row(x, k, SYNTHETIC, cfg))
        if n in exact_sizes:
            rows.append(exact_row(x, k, SYNTHETIC))
        del x
    return rows


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` with every row of `new` replacing the one of the same (data, method, n)."""
    key = lambda r: (r["data"], r["method"], r["n"])  # noqa: E731
    out = {key(r): r for r in old if not r.get("extrapolated")}
    out.update({key(r): r for r in new})
    return sorted(out.values(), key=lambda r: (r["data"] != SYNTHETIC, r["n"], r["method"]))


def table(rows: list[dict[str, Any]]) -> str:
    head = ("data", "N", "method", "index", "nprobe", "recall@k (sample)", "edges' recall (threshold)",
            "edge nprobe", "join rounds", "all-rows lists' recall@k", "train s", "search s", "join s", "total s",
            "exact / ann")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ann_s = {(r["data"], r["n"]): r["total_s"] for r in rows if r["method"] == "ann"}
    for r in rows:
        sec = r.get("seconds", {})
        if r.get("total_s") is None:  # a run stopped before it ended (its row says why)
            out.append(f"| {r['data'][:40]} | {r['n']:,} | {r['method']} | {r.get('index_type', '-')} | "
                       f"{r.get('nprobe', '-')} | {r.get('recall_at_k', '-')} | - | - | - | - | - | - | - | stopped | |")
            continue
        total = f"{r['total_s']:.1f}" + (" (extrapolated)" if r.get("extrapolated") else "")
        ratio = (f"{r['total_s'] / ann_s[(r['data'], r['n'])]:.1f}x" if r["method"] == "exact"
                 and ann_s.get((r["data"], r["n"])) else "")
        recall = f"{r['recall_at_k']:.3f} ({r['recall_sample']})" if r["method"] == "ann" else "1 (exact)"
        edges = (f"{r['edge_recall']:.3f} (>= {r['threshold']:g})" if "edge_recall" in r
                 else "1 (exact)" if r["method"] == "exact" else "-")
        lists = r.get("lists_recall_at_k")
        lists = "-" if lists is None or lists != lists else f"{lists:.3f}"  # absent, or NaN (no join measured)
        out.append(f"| {r['data'][:40]} | {r['n']:,} | {r['method']} | {r.get('index_type', 'blocked matmul')} | "
                   f"{r.get('nprobe', '-')} | {recall} | {edges} | {r.get('edge_nprobe', '-')} | "
                   f"{r.get('join_rounds', '-')} | {lists} | {sec.get('train', 0):.1f} | {sec.get('search', 0):.1f} | "
                   f"{sec.get('join', 0):.1f} | {total} | {ratio} |")
    return "\n".join(out)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    head = ("data", "N", "nlist", "refine", "nprobe", "recall@k", "edges' recall (threshold)",
            "all-rows search s (EXTRAPOLATED)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {r['data'][:40]} | {r['n']:,} | {r['nlist']} | {r['refine_factor']} | {r['nprobe']} | "
                   f"{r['recall_at_k']:.3f} | {r['edge_recall']:.3f} (>= {r['threshold']:g}) | "
                   f"{r['all_rows_search_s_extrapolated']:.0f} (from {r['timed_queries']:,} queries) |")
    return "\n".join(out)


def _sizes(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _merge_sweeps(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` with each row of `new` replacing the one of the same data, size, threshold and setting."""
    key = lambda r: (r["data"], r["n"], r["threshold"], r["refine_factor"], r["nprobe"])  # noqa: E731
    out = {key(r): r for r in old}
    out.update({key(r): r for r in new})
    return sorted(out.values(), key=lambda r: (r["n"], r["refine_factor"], r["nprobe"]))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e5", help="synthetic vector counts (comma-separated)")
    p.add_argument("--exact-sizes", default="1e5", help="sizes where exact blocked search is also timed")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="FAISS threads (0: every core)")
    p.add_argument("--real-output", type=Path, default=None, help="an ingest output: recall on its embeddings")
    p.add_argument("--threshold", type=float, default=None,
                   help="kNN edge threshold (default: graph.knn_threshold's default, as the pipeline)")
    p.add_argument("--sweep-sizes", default="", help="synthetic sizes for an nprobe sweep (recall per setting)")
    p.add_argument("--sweep-nprobes", default="16,32,64,128,256,512")
    p.add_argument("--sweep-refine", default="4")
    p.add_argument("--out", type=Path, default=Path("docs/bench_knn.json"))
    args = p.parse_args(argv)
    real = None
    if args.real_output is not None:
        from hades_gpu.graph.io import load_chunk_table

        real = load_chunk_table(args.real_output).embedding
    rows = knn_section(_sizes(args.sizes), _sizes(args.exact_sizes), args.dim, args.k, real, args.threads,
                       args.threshold)
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = merge_rows(saved.get("rows", []), rows)
    sweeps = _merge_sweeps(saved.get("sweeps", []), [
        row for n in _sizes(args.sweep_sizes)
        for row in nprobe_sweep(synthetic_chunk_embeddings(n, args.dim), args.k, SYNTHETIC,
                                bench_graph_config(args.k, args.threads, args.threshold),
                                _sizes(args.sweep_nprobes), _sizes(args.sweep_refine))])
    all_sizes = sorted({r["n"] for r in rows if r["data"] == SYNTHETIC})
    rows = rows + extrapolate_exact(rows, all_sizes, args.dim, args.k)
    print(table(rows))
    if sweeps:
        print(sweep_table(sweeps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "note": "kNN build + query-all; vectors labelled by `data` (SYNTHETIC unless real); this box: 2 cores "
                "SHARED with other engineers' jobs, so seconds are upper bounds",
        "host": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}, "rows": rows, "sweeps": sweeps},
        indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
