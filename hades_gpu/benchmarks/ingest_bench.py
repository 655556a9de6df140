"""End-to-end ingest benchmark on real text and code found on this machine, all in one run.

Measures, on the same corpus and the same chunk texts:
  * `hades-ingest` end to end (a real subprocess: workers, batcher, embedder, Parquet) per profile;
  * the model-only ceiling: the same chunks pre-tokenized, through the shipped embed stage
    (batcher, ring, queues, embed threads) with the same runtime and concurrency;
  * sentence-transformers `encode()` (batch 32) on a uniform sample of the same chunk texts;
and prints a table of throughputs, ratios, padding efficiency and peak RSS, and writes JSON.

Usage: python scripts/bench_ingest.py [--corpus-mb 5] [--profiles balanced,low_memory,high_throughput]
                                      [--scale-profile low_memory --scale 4] [--out bench_ingest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import hades_gpu
from hades_gpu.benchmarks.corpus import build_corpus, scale_corpus
from hades_gpu.benchmarks.rows import metrics_row

REPO = Path(hades_gpu.__file__).resolve().parent.parent  # the checkout: `python -m hades_gpu.ingest` runs from it

def ingest_subprocess(corpus: Path, output: Path, extra: list[str]) -> tuple[float, dict]:
    """One `hades-ingest` run in a fresh output: its wall on this clock (process start and model load
    included) and the metrics.json it wrote."""
    if output.exists():
        shutil.rmtree(output)
    cmd = [sys.executable, "-m", "hades_gpu.ingest", f"corpus={corpus}", f"output={output}",
           "isne.enabled=false", "monitoring.progress=off", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"hades-ingest {' '.join(extra)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, json.loads((output / "metrics.json").read_text())


def run_ingest(corpus: Path, output: Path, profile: str, extra: list[str]) -> dict:
    wall, metrics = ingest_subprocess(corpus, output, [f"profile={profile}", *extra])
    return {"profile": profile, **metrics_row(metrics, wall_s=wall)}


def chunk_texts(output: Path) -> list[str]:
    from hades_gpu.store.reader import read_chunks

    return read_chunks(output, ["text"]).column("text").to_pylist()


def pipeline_vectors(output: Path) -> dict[str, np.ndarray]:
    """Each chunk text's stored embedding (the first one where a text repeats)."""
    from hades_gpu.store.reader import read_chunks

    table = read_chunks(output, ["text", "embedding"])
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    out: dict[str, np.ndarray] = {}
    for text, vec in zip(table.column("text").to_pylist(), vectors):
        out.setdefault(text, vec)
    return out


def model_only(texts: list[str], profile: str) -> dict:
    """The same chunks, pre-tokenized, through the shipped embed stage (its batcher, ring, queues
    and embed threads; `hades_gpu.benchmarks.stage`): the ceiling the CPU side is measured against."""
    from hades_gpu.benchmarks.stage import documents_from_texts, embed_documents
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.embedding.factory import build_embedder

    cfg = load_pipeline_config(profile)
    docs = documents_from_texts(texts, cfg.chunking.chunk_tokens)
    embedder = build_embedder(cfg)
    try:
        embed_documents(cfg, docs[: 4 * cfg.profile.max_batch_size], embedder)  # warm-up
        run = embed_documents(cfg, docs, embedder)
        description = embedder.description
    finally:
        embedder.close()
    return {"chunks_per_s": len(docs) / run.seconds, "tokens_per_s": run.real_tokens / run.seconds,
            "seconds": run.seconds, "padding_efficiency": run.metrics["padding_efficiency"], "embedder": description}


def sentence_transformers_baseline(texts: list[str], sample: int, seed: int = 0) -> dict:
    from sentence_transformers import SentenceTransformer

    from hades_gpu.documents.tokenizer import load_tokenizer, model_dir

    rng = random.Random(seed)
    chosen = texts if len(texts) <= sample else rng.sample(texts, sample)
    model = SentenceTransformer(str(model_dir()), device="cpu")
    model.encode(chosen[:32], batch_size=32)  # warm-up
    start = time.perf_counter()
    vectors = model.encode(chosen, batch_size=32, normalize_embeddings=True)
    elapsed = time.perf_counter() - start
    tok = load_tokenizer()
    tokens = sum(min(len(e.ids), 254) + 2 for e in tok.encode_batch(chosen, add_special_tokens=False))
    return {"chunks": len(chosen), "chunks_per_s": len(chosen) / elapsed, "tokens_per_s": tokens / elapsed,
            "seconds": elapsed, "torch_threads": __import__("torch").get_num_threads(),
            "texts": chosen, "vectors": np.asarray(vectors, dtype=np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=float, default=5.0)
    ap.add_argument("--profiles", default="balanced,low_memory,high_throughput")
    ap.add_argument("--scale-profile", default="low_memory", help="profile also run on a scaled corpus")
    ap.add_argument("--scale", type=int, default=4, help="copies of the corpus for the memory check (0: skip)")
    ap.add_argument("--st-sample", type=int, default=800, help="chunks encoded by sentence-transformers")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hades-bench-ingest"))
    ap.add_argument("--out", type=Path, default=Path("bench_ingest.json"))
    args = ap.parse_args()

    work = args.workdir
    corpus = work / "corpus-1x"
    sizes = build_corpus(corpus, args.corpus_mb)
    print(f"corpus: {sum(sizes.values()) / 1e6:.2f} MB ({sizes['code'] / 1e6:.2f} MB code, "
          f"{sizes['prose'] / 1e6:.2f} MB prose) in {corpus}", flush=True)

    runs = []
    profiles = [p for p in args.profiles.split(",") if p]
    for profile in profiles:
        print(f"hades-ingest profile={profile} ...", flush=True)
        runs.append({**run_ingest(corpus, work / f"out-{profile}", profile, []), "scale": 1})
    if args.scale > 1:
        scaled = work / f"corpus-{args.scale}x"
        scale_corpus(corpus, scaled, args.scale)
        print(f"hades-ingest profile={args.scale_profile} on {args.scale}x ...", flush=True)
        runs.append({**run_ingest(scaled, work / f"out-{args.scale_profile}-{args.scale}x", args.scale_profile, []),
                     "scale": args.scale})
        shutil.rmtree(scaled)

    reference_profile = profiles[0]
    texts = chunk_texts(work / f"out-{reference_profile}")
    print(f"model-only ceiling on {len(texts)} chunks ...", flush=True)
    ceiling = model_only(texts, reference_profile)
    print(f"sentence-transformers encode() on {min(len(texts), args.st_sample)} chunks ...", flush=True)
    st = sentence_transformers_baseline(texts, args.st_sample)

    # quality: the stored vector of every sampled chunk against sentence-transformers' vector of its text
    ours = pipeline_vectors(work / f"out-{reference_profile}")
    cos = np.einsum("ij,ij->i", np.stack([ours[t] for t in st.pop("texts")]), st.pop("vectors"))
    st["cosine_vs_pipeline"] = {"min": float(cos.min()), "mean": float(cos.mean()), "chunks": int(cos.size)}
    print(f"cosine of the pipeline's stored vectors vs sentence-transformers on {cos.size} chunks: "
          f"min {cos.min():.5f}, mean {cos.mean():.5f}", flush=True)
    for run in runs:
        run["x_sentence_transformers"] = run["chunks_per_s"] / st["chunks_per_s"]
        run["x_model_only"] = run["chunks_per_s"] / ceiling["chunks_per_s"]

    rows = [("sentence-transformers encode (bs 32)", st["chunks_per_s"], st["tokens_per_s"], 1.0, "", "", "")]
    rows.append(("model-only ceiling", ceiling["chunks_per_s"], ceiling["tokens_per_s"],
                 ceiling["chunks_per_s"] / st["chunks_per_s"], 1.0, ceiling["padding_efficiency"], ""))
    for run in runs:
        name = f"hades-ingest {run['profile']}" + (f" ({run['scale']}x corpus)" if run["scale"] > 1 else "")
        rows.append((name, run["chunks_per_s"], run["tokens_per_s"], run["x_sentence_transformers"],
                     run["x_model_only"], run["padding_efficiency"], run["peak_rss_bytes"] / 2**30))
    header = ("path", "chunks/s", "tokens/s", "x s-t", "x ceiling", "padding eff.", "peak RSS GiB")
    widths = [max(len(str(h)), 40 if i == 0 else 12) for i, h in enumerate(header)]

    def fmt(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(fmt(v).ljust(w) for v, w in zip(row, widths)))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "corpus_bytes": sizes,
        "chunks": len(texts),
        "sentence_transformers": st,
        "model_only": ceiling,
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
