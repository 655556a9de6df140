"""Speed and accuracy of the local embedder per precision (fp32, default, int8), on local text.

For N chunks of ~254 content tokens cut from this machine's text (Python stdlib sources and
/usr/share/doc; nothing is downloaded) it times the model call + pooling (both inside the exported
graph) with `concurrency` threads, after one warm-up batch, and compares each precision with the fp32
reference of the same runtime:

- cosine min / mean per chunk;
- top-10 overlap: the share of each chunk's 10 nearest neighbours (cosine, among the N, itself
  excluded) that the reduced precision keeps, averaged over chunks.

Prints a table and, with ``--out``, writes the figures as JSON. ``--baseline`` adds
sentence-transformers ``encode`` (batch 32) for the "x s-t" column.

    python scripts/measure_precision.py --n 300 --out precision.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from typing import Optional

import numpy as np

from hades_gpu.benchmarks.stage import documents_from_texts, embed_documents
from hades_gpu.config import EmbedderConfig, PipelineConfig
from hades_gpu.embedding import export
from hades_gpu.embedding.local import LocalEmbedder
from hades_gpu.optional import import_openvino


def topk_overlap(ref: np.ndarray, got: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours under `ref` that `got` also ranks in its top k."""
    def neighbours(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T  # (N, N), rows are unit vectors
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k, axis=1)[:, :k]  # (N, k), unordered

    a, b = neighbours(ref), neighbours(got)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def time_embedder(emb, docs: list, cfg: PipelineConfig, repeats: int) -> tuple[np.ndarray, float]:
    """(vectors, best chunks/s over `repeats`) through the shipped embed stage (`benchmarks.stage`:
    batcher, ring, queues and `emb.concurrency` embed threads)."""
    embed_documents(cfg, docs[: 2 * cfg.profile.max_batch_size], emb)  # warm-up: compilation, thread pools
    best, vecs = 0.0, None
    for _ in range(repeats):
        run = embed_documents(cfg, docs, emb)
        best, vecs = max(best, len(docs) / run.seconds), run.embeddings
    assert vecs is not None
    return vecs, best


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="chunks (default: 300)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per embed call (default: 8)")
    ap.add_argument("--runtime", default="openvino", choices=["openvino", "onnxruntime", "torch"])
    ap.add_argument("--precisions", default="fp32,default,int8",
                    help="comma list; int8 is skipped when nncf is not installed (default: fp32,default,int8)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes, best kept (default: 1)")
    ap.add_argument("--threads", type=int, default=0, help="runtime threads, 0 = all cores")
    ap.add_argument("--cache-dir", default="", help="model cache (default: ~/.cache/hades-gpu/models)")
    ap.add_argument("--baseline", action="store_true", help="also time sentence-transformers encode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch")

    texts = export.local_text_chunks(args.n, chunk_tokens=254, seed=args.seed)
    ids, _ = export.token_batch(texts, bucket=16)
    docs = documents_from_texts(texts, 254)
    stage_cfg = PipelineConfig()
    stage_cfg.profile = dataclasses.replace(stage_cfg.profile, max_batch_size=args.batch,
                                            max_batch_tokens=max(args.batch * 256, 256))
    print(f"{len(texts)} chunks, padded length {ids.shape[1]}, batch {args.batch}, runtime {args.runtime}",
          file=sys.stderr)

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "fp32" in precisions:
        precisions.remove("fp32")
    precisions.insert(0, "fp32")  # the reference comes first
    rows: list[dict] = []
    ref: Optional[np.ndarray] = None
    for prec in precisions:
        if prec == "int8":
            try:
                import_openvino()  # before nncf imports it (optional.py)
                import nncf  # noqa: F401
            except ImportError:
                print("int8: skipped (nncf not installed; pip install 'hades-gpu[int8]')", file=sys.stderr)
                continue
        cfg = EmbedderConfig(runtime=args.runtime, precision=prec, threads=args.threads, cache_dir=args.cache_dir)
        emb = LocalEmbedder(cfg)
        try:
            vecs, rate = time_embedder(emb, docs, stage_cfg, args.repeats)
        finally:
            emb.close()
        if ref is None:
            ref = vecs
        cos = (vecs * ref).sum(1)  # both unit-norm
        rows.append({"precision": prec, "description": emb.description, "concurrency": emb.concurrency,
                     "chunks_per_s": round(rate, 2), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                     "top10": topk_overlap(ref, vecs)})
        print(f"  {emb.description}: {rate:.1f} chunks/s", file=sys.stderr)

    st_rate = None
    if args.baseline:
        from sentence_transformers import SentenceTransformer

        from hades_gpu.documents.tokenizer import model_dir

        st = SentenceTransformer(str(model_dir()), device="cpu")
        st.encode(texts[:32], batch_size=32)
        t0 = time.perf_counter()
        st_vecs = st.encode(texts, batch_size=32)
        st_rate = len(texts) / (time.perf_counter() - t0)
        cos = (np.asarray(st_vecs) * ref).sum(1) / np.linalg.norm(st_vecs, axis=1)
        rows.append({"precision": "sentence-transformers", "description": "sentence-transformers encode (bs 32)",
                     "concurrency": 1, "chunks_per_s": round(st_rate, 2), "cos_min": float(cos.min()),
                     "cos_mean": float(cos.mean()), "top10": topk_overlap(ref, np.asarray(st_vecs))})

    print(f"\n| {'embedder':<52} | chunks/s | x s-t | cos min  | cos mean | top-10 |")
    print(f"|{'-' * 54}|----------|-------|----------|----------|--------|")
    for r in rows:
        speedup = f"{r['chunks_per_s'] / st_rate:5.2f}" if st_rate else "    -"
        print(f"| {r['description']:<52} | {r['chunks_per_s']:8.1f} | {speedup} | {r['cos_min']:.6f} "
              f"| {r['cos_mean']:.6f} | {r['top10']:.3f}  |")

    if args.out:
        report = {"n": len(texts), "batch": args.batch, "padded_length": int(ids.shape[1]),
                  "runtime": args.runtime, "cpu": platform.processor() or platform.machine(),
                  "cores": len(os.sched_getaffinity(0)), "rows": rows}
        try:
            ov = import_openvino()  # without its usage telemetry (optional.py)

            report["openvino_cpu_capabilities"] = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except ImportError:
            pass
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0
