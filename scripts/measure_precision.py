#!/usr/bin/env python
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
import json
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.config import EmbedderConfig  # noqa: E402
from hades_gpu.embedding import export  # noqa: E402
from hades_gpu.embedding.local import LocalEmbedder  # noqa: E402


def topk_overlap(ref: np.ndarray, got: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours under `ref` that `got` also ranks in its top k."""
    def neighbours(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T  # (N, N), rows are unit vectors
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k, axis=1)[:, :k]  # (N, k), unordered

    a, b = neighbours(ref), neighbours(got)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def time_embedder(emb, batches: list[tuple[np.ndarray, np.ndarray]], repeats: int) -> tuple[np.ndarray, float]:
    """(vectors, best chunks/s over `repeats`) with `emb.concurrency` threads calling `embed`."""
    emb.embed(*batches[0])  # warm-up: first-shape compilation, thread pools
    n = sum(b[0].shape[0] for b in batches)
    best = 0.0
    out: Optional[list[np.ndarray]] = None
    with ThreadPoolExecutor(max(1, emb.concurrency)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = list(pool.map(lambda b: emb.embed(*b), batches))
            best = max(best, n / (time.perf_counter() - t0))
    assert out is not None
    return np.concatenate(out), best


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
    ids, mask = export.token_batch(texts, bucket=16)
    batches = [(ids[i : i + args.batch], mask[i : i + args.batch]) for i in range(0, len(texts), args.batch)]
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
                import nncf  # noqa: F401
            except ImportError:
                print("int8: skipped (nncf not installed; pip install 'hades-gpu[int8]')", file=sys.stderr)
                continue
        cfg = EmbedderConfig(runtime=args.runtime, precision=prec, threads=args.threads, cache_dir=args.cache_dir)
        emb = LocalEmbedder(cfg)
        try:
            vecs, rate = time_embedder(emb, batches, args.repeats)
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
            import openvino as ov

            report["openvino_cpu_capabilities"] = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except ImportError:
            pass
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
