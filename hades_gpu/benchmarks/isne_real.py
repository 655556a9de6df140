"""ISNE on the chunk graph of a real corpus: cost per epoch, and what the edge weights change.

The corpus is the standard library's packages (`benchmarks.corpus.build_package_corpus`), so each
chunk has a label no edge was built from directly: its package (the first folder of its path). It is
ingested with the real model (untimed here; the ingest's own wall time is reported), the chunk graph
built (sequence, same_document, reference and kNN edges, `graph.*_weight`), and ISNE trained twice
with the same seed, epochs and walks: with the edge weights (`isne.edge_weights=true`: weighted walks
and neighbour means) and without. Quality is the paper's protocol on the labelled chunks: 15 nearest
neighbours by dot product, majority vote, 5-fold cross-validation; the MiniLM text vectors of the
same chunks are the reference. Early stopping and the time budget are off, so both runs get the same
number of epochs.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hades_gpu.config import PipelineConfig


def _labels(out: Path, corpus: Path, chunk_ids: np.ndarray, min_per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(row indices of labelled chunks, their class ids, class names): package = first path folder;
    files at the top level and packages with fewer than `min_per_class` chunks stay unlabelled."""
    import pyarrow.parquet as pq

    from hades_gpu.store.reader import committed_part_files

    files = committed_part_files(out, "chunks")
    t = pq.ParquetDataset(files).read(columns=["chunk_id", "path"])
    root = str(Path(corpus).resolve()) + "/"
    rel = [p[len(root):] if p.startswith(root) else p for p in t.column("path").to_pylist()]
    pkg_of = {c: (p.split("/")[0] if "/" in p else None) for c, p in zip(t.column("chunk_id").to_pylist(), rel)}
    pkgs = np.array([pkg_of.get(c) for c in chunk_ids.tolist()], dtype=object)
    names, counts = np.unique(pkgs[pkgs != None], return_counts=True)  # noqa: E711 (numpy comparison)
    keep = [str(n) for n, c in zip(names, counts) if c >= min_per_class]
    code = {n: i for i, n in enumerate(keep)}
    rows = np.array([i for i, p in enumerate(pkgs) if p in code], dtype=np.int64)
    return rows, np.array([code[pkgs[i]] for i in rows], dtype=np.int64), keep


def run(cfg: PipelineConfig, work: Path, megabytes: float = 2.0, epochs: int = 10, k: int = 15,
        folds: int = 5, min_per_class: int = 20, embedder: Any = None) -> dict[str, Any]:
    """Build the corpus under `work`, ingest it (with `embedder`, default: built from `cfg`), then
    train and score ISNE with and without weights."""
    from hades_gpu.benchmarks.corpus import build_package_corpus
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    work = Path(work)
    sizes = build_package_corpus(work / "corpus", megabytes)
    out = work / "dataset"
    if out.exists():
        shutil.rmtree(out)  # a fresh ingest: a resumed one would time nothing
    ingest_cfg = dataclasses.replace(cfg, isne=dataclasses.replace(cfg.isne, enabled=False))
    ingested = TextParallelPipeline(ingest_cfg, embedder=embedder).process_batch([work / "corpus"], output=out)

    result = score_output(cfg, out, work / "corpus", epochs, k, folds, min_per_class)
    result["corpus"] = {"packages": len(sizes), "bytes": sum(sizes.values()),
                        "documents": ingested.documents_ingested + ingested.documents_unchanged}
    result["ingest_wall_s"] = float(ingested.metrics.get("wall_s", 0.0))
    return result


def score_output(cfg: PipelineConfig, out: Path, corpus: Path, epochs: int = 10, k: int = 15, folds: int = 5,
                 min_per_class: int = 20) -> dict[str, Any]:
    """On an ingest output of `corpus`: the chunk graph, then ISNE with and without edge weights
    (same seed and epochs): s/epoch, pairs/s, peak RSS, and 15-NN accuracy on the first-folder labels
    (None when fewer than two folders have `min_per_class` chunks)."""
    from hades_gpu.graph.build import build_graph
    from hades_gpu.graph.io import load_chunk_table
    from hades_gpu.isne.evaluation import knn_cv_accuracy
    from hades_gpu.isne.inference import neighbor_mean
    from hades_gpu.isne.sampling import CSRGraph
    from hades_gpu.isne.trainer import train_isne

    t = time.perf_counter()
    graph = build_graph(out, cfg.graph)
    graph_s = time.perf_counter() - t
    data = graph.to_data(undirected=True)
    n = graph.num_nodes
    rows, y, classes = _labels(out, corpus, graph.chunk_ids, min_per_class)
    labelled = len(classes) >= 2

    def accuracy(x: torch.Tensor) -> Any:
        return knn_cv_accuracy(x[rows], torch.as_tensor(y), k, folds, cfg.seed) if labelled else None

    text = torch.as_tensor(load_chunk_table(out).embedding)  # same order as the graph (chunk id)
    result: dict[str, Any] = {
        "nodes": n, "edges": int(data.edge_index.shape[1] // 2), "edges_by_type": graph.counts_by_type(),
        "labelled_chunks": int(rows.size), "classes": classes, "graph_seconds": graph_s,
        "text_accuracy": accuracy(text),
        "runs": {},
    }
    for weighted in (True, False):
        icfg = dataclasses.replace(cfg.isne, edge_weights=weighted, early_stop="off", time_budget_s=None,
                                   time_budget_vs_embedding=0.0, val_fraction=0.0, device="cpu")
        t = time.perf_counter()
        res = train_isne(data.edge_index, n, icfg, epochs=epochs, edge_weight=data.edge_attr)
        seconds = time.perf_counter() - t
        full = CSRGraph.from_edge_index(data.edge_index, n, edge_weight=data.edge_attr if weighted else None)
        x = neighbor_mean(res.model.theta.weight.detach(), full)
        result["runs"]["weighted" if weighted else "unweighted"] = {
            "accuracy": accuracy(x),
            "epochs": res.epochs_run, "seconds": seconds, "vector_sum": float(x.double().abs().sum()),
            "epoch_seconds": res.train_seconds / max(res.epochs_run, 1), "pairs_per_s": res.pairs_per_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return result


def _acc(a: Any) -> str:
    return "-" if a is None else f"{a:.3f}"


def table(r: dict[str, Any]) -> str:
    head = ("vectors", "15-NN package accuracy (5-fold)", "s/epoch", "pairs/s", "peak RSS MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| MiniLM text vectors (reference) | {_acc(r['text_accuracy'])} | - | - | - |"]
    for name, run_ in r["runs"].items():
        lines.append(f"| ISNE, {name} edges | {_acc(run_['accuracy'])} | {run_['epoch_seconds']:.2f} | "
                     f"{run_['pairs_per_s']:,.0f} | {run_['peak_rss_mb']:.0f} |")
    source = (f"{r['corpus']['documents']} stdlib files in {r['corpus']['packages']} packages"
              if "corpus" in r else "the corpus")
    lines.append(f"\nchunk graph of {source}: {r['nodes']:,} chunks, {r['edges']:,} edges {r['edges_by_type']}, "
                 f"{r['labelled_chunks']:,} labelled in {len(r['classes'])} packages")
    return "\n".join(lines)
