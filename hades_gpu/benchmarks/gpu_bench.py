"""GPU embedding benchmark: one run, a table and a JSON file.

On chunks cut from this machine's Python stdlib sources (tokenized with the model's own tokenizer,
254 content tokens per chunk, nothing downloaded) it measures:

1. **GPU path**: the pipeline's batching (`LengthSortedBatcher`, length buckets, token budget,
   shared-memory slabs page-locked with cudaHostRegister, `gpu.slabs.SlabRing`) feeding `CudaEmbedder.embed` from `concurrency` threads, as the pipeline's
   embed stage does. Tokens/s = real (unpadded) tokens / wall time, after a full warm-up pass
   (CUDA graphs captured). Also shown with the tokenization time of the same chunks added serially
   (the pipeline tokenizes in worker processes, in parallel; adding it is the conservative figure).
2. **sentence-transformers** `encode()` on the same chunk texts, fp32 and fp16 (``model.half()``),
   batch ``--st-batch``, after a warm-up call; tokenization included (it is part of `encode`).
3. **FLOP limit**: forward FLOPs of MiniLM-L6 per token at each batch's padded length
   (`flops_per_token`), summed over batches, against the device's peak dense bf16 TFLOP/s from a
   table by device name (H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989): the fraction reached.
4. **Copy/compute overlap**: the embed stage alone on pre-filled pinned batches, with side-stream
   copies (`StreamProducer`, 3 batches in flight) against synchronous copies on the compute stream,
   with CUDA graphs and eagerly.
5. **Governor**: a second run with ``gpu.mem_high`` set artificially low (half-way between the memory
   used before the run and the peak of the unconstrained run), sampling NVML's used memory every
   few ms in a side thread: the maximum seen, against the limit.
6. **End to end**: the shipped pipeline (`TextParallelPipeline`: discovery, worker processes that
   read/chunk/tokenize/pack into pinned slabs, CUDA embedder, Parquet writer) over a folder of real files
   (``--ingest-mb`` of stdlib sources copied to a temporary folder), files to Parquet, wall clock.

Without CUDA it exits with code 2, unless ``--allow-cpu`` (a smoke run on a few chunks).

    python scripts/bench_gpu.py --chunks 20000 --json bench_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from hades_gpu.config import PipelineConfig, load_pipeline_config
from hades_gpu.documents.tokenizer import load_tokenizer, model_dir, special_ids
from hades_gpu.embedding.cuda_embedder import CudaEmbedder, flops_per_token
from hades_gpu.gpu.slabs import SlabRing
from hades_gpu.gpu.nvml import memory_reader
from hades_gpu.gpu.nvml_governor import MemoryGovernor
from hades_gpu.gpu.stream_producer import StreamProducer, timed_map
from hades_gpu.benchmarks.corpus import build_corpus, stdlib_files
from hades_gpu.benchmarks.rows import metrics_row
from hades_gpu.benchmarks.stage import documents_from_chunks, embed_documents
from hades_gpu.orchestration.batcher import BatchPlan, LengthSortedBatcher, fill_batch
from hades_gpu.orchestration.pipeline import slab_count, slab_layout
from hades_gpu.records import CODE, Chunk, stable_id

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' data sheets; matched in order
# against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


def peak_bf16_tflops(name: str) -> Optional[float]:
    upper = name.upper()
    for key, value in PEAK_BF16_TFLOPS:
        if key in upper:
            return value
    return None


# -- data ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    docs: list[list[Chunk]]  # chunks per source file, in order
    tokenize_s: float  # time to tokenize the chunk texts once more (as encode() would)

    @property
    def chunks(self) -> list[Chunk]:
        return [c for d in self.docs for c in d]


def stdlib_corpus(n_chunks: int, chunk_tokens: int, min_tokens: int) -> Corpus:
    """Chunks of `chunk_tokens` content tokens from the stdlib's .py files (sorted, deterministic)."""
    tok = load_tokenizer()
    docs: list[list[Chunk]] = []
    total = 0
    for path in stdlib_files(max_bytes=2_000_000):
        if total >= n_chunks:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        enc = tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        doc_id = stable_id(str(path))
        chunks = []
        for ordinal, start in enumerate(range(0, len(ids), chunk_tokens)):
            window = ids[start:start + chunk_tokens]
            if len(window) < min_tokens:
                break
            a, b = offsets[start][0], offsets[start + len(window) - 1][1]
            chunks.append(Chunk(doc_id=doc_id, chunk_id=stable_id(doc_id, str(ordinal)), path=str(path),
                                modality=CODE, ordinal=ordinal, char_start=a, char_end=b, text=text[a:b],
                                token_ids=np.zeros(0, dtype=np.int32)))
            if total + len(chunks) >= n_chunks:
                break
        if chunks:
            docs.append(chunks)
            total += len(chunks)
    # Token ids of each chunk's own text (a window may start inside a word: "##out" alone is not what
    # encode() would see), so both paths embed exactly the same tokens. Timed: the tokenization cost.
    flat = [c for d in docs for c in d]
    t0 = time.perf_counter()
    encs = tok.encode_batch([c.text for c in flat], add_special_tokens=False)
    seconds = time.perf_counter() - t0
    for c, e in zip(flat, encs):
        c.token_ids = np.asarray(e.ids[:chunk_tokens], dtype=np.int32)
    return Corpus(docs, seconds)


def plan_stream(corpus: Corpus, cfg: PipelineConfig, budget_fn: Optional[Callable[[int], int]] = None) -> Iterator[BatchPlan]:
    """The pipeline's batches, cut lazily document by document (so a governor's budget applies)."""
    p = cfg.profile
    batcher = LengthSortedBatcher(p.max_batch_tokens, p.max_batch_size, p.length_bucket, cfg.embedder.max_seq_len,
                                  p.lookahead_batches, budget_fn=budget_fn)
    for doc in corpus.docs:
        yield from batcher.add(doc)
    yield from batcher.flush()


# -- measurements ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class PathRun:
    seconds: float
    embeddings: np.ndarray  # (N, dim) in corpus order
    batches: int
    real_tokens: int
    padded_tokens: int
    flops: float


def run_gpu_path(embedder: CudaEmbedder, corpus: Corpus, cfg: PipelineConfig, ring: SlabRing,
                 budget_fn: Optional[Callable[[int], int]] = None, governor: Any = None) -> PathRun:
    """The shipped embed stage (batcher -> pinned shared-memory slab -> embed on `concurrency` threads,
    `hades_gpu.benchmarks.stage.embed_documents`) over the corpus; vectors in corpus order."""
    run = embed_documents(cfg, documents_from_chunks(corpus.docs), embedder, ring=ring, governor=governor,
                          budget_fn=budget_fn, sync=lambda: sync(embedder.device))
    flops = sum(rows * length * flops_per_token(length) for rows, length in run.shapes)
    return PathRun(run.seconds, run.embeddings, run.batches, run.real_tokens, run.padded_tokens, flops)


def run_st(texts: list[str], device: torch.device, half: bool, batch_size: int, max_seq_len: int) -> tuple[np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device=str(device))
    model.max_seq_length = max_seq_len
    if half:
        model.half()
    kw = dict(batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    model.encode(texts[: 4 * batch_size], **kw)  # warm-up
    sync(device)
    start = time.perf_counter()
    emb = model.encode(texts, **kw)
    sync(device)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return np.asarray(emb, dtype=np.float32), seconds


def prefilled_batches(corpus: Corpus, cfg: PipelineConfig, pin: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[BatchPlan]]:
    """Every batch of the corpus written once into its own (pinned) host arrays."""
    cls_id, sep_id, pad_id = special_ids()
    batches, plans = [], []
    for plan in plan_stream(corpus, cfg):
        b = fill_batch(plan, None, -1, cls_id, sep_id, pad_id)
        if pin:
            ids = torch.from_numpy(b.input_ids).pin_memory().numpy()
            mask = torch.from_numpy(b.attention_mask).pin_memory().numpy()
        else:
            ids, mask = b.input_ids, b.attention_mask
        batches.append((ids, mask))
        plans.append(plan)
    return batches, plans


def overlap(embedder: CudaEmbedder, batches: list[tuple[np.ndarray, np.ndarray]], repeats: int = 2,
            warmups: int = 2) -> dict[str, float]:
    """Embed stage alone: side-stream copies (3 in flight) vs synchronous copies; best of `repeats`."""
    side = embedder.producer
    sync_p = StreamProducer(embedder.device, embedder._compute, embedder.dim, side._out_pool.max_rows  # type: ignore[union-attr]
                            if side._out_pool is not None else 256, embedder.max_len, side_streams=False,
                            compute_stream=side.compute_stream)
    for _ in range(warmups):  # graphs for every bucket (captured on a bucket's second use)
        timed_map(side, batches, depth=3)
    t_side = min(timed_map(side, batches, depth=3)[1] for _ in range(repeats))
    t_sync = min(timed_map(sync_p, batches, depth=1)[1] for _ in range(repeats))
    return {"side_stream_s": t_side, "sync_copies_s": t_sync, "speedup": t_sync / t_side}


class NvmlSampler(threading.Thread):
    """Samples the device's used memory (NVML) every `interval_s` until stopped."""

    def __init__(self, index: int, interval_s: float = 0.003) -> None:
        super().__init__(daemon=False)
        reader, source = memory_reader(index)  # the package's one GPU memory reader
        if reader is None:
            raise RuntimeError(f"no GPU memory reader: {source}")
        self._read = reader
        self.interval_s = interval_s
        self.samples: list[int] = []
        self.total = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                used, self.total = self._read()
                self.samples.append(used)
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass
            self._stop_event.wait(self.interval_s)

    def stop(self) -> "NvmlSampler":
        self._stop_event.set()
        self.join(timeout=5)
        return self

    @property
    def max_used(self) -> int:
        return max(self.samples) if self.samples else 0


def used_now(index: int) -> int:
    reader, _ = memory_reader(index)
    return reader()[0] if reader is not None else 0


# -- report ----------------------------------------------------------------------------------------


def cos_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = (a * b).sum(1)
    return {"min": float(c.min()), "mean": float(c.mean())}


def gib(x: float) -> float:
    return round(x / 2**30, 3)


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=20000, help="chunks of stdlib source (default 20000; 24 on CPU)")
    ap.add_argument("--profile", default="high_throughput", help="hardware profile (default high_throughput)")
    ap.add_argument("--override", action="append", default=[], help="Hydra override, e.g. gpu.cuda_graphs=false")
    ap.add_argument("--st-batch", type=int, default=128, help="sentence-transformers encode batch size")
    ap.add_argument("--json", default="bench_gpu.json", help="where to write the JSON ('-' = stdout)")
    ap.add_argument("--allow-cpu", action="store_true", help="run a CPU smoke test when there is no GPU")
    ap.add_argument("--skip-st", action="store_true", help="leave out sentence-transformers")
    ap.add_argument("--skip-governor", action="store_true", help="leave out the low mem_high run")
    ap.add_argument("--ingest-mb", type=float, default=20.0, help="MB of stdlib files for the end-to-end run "
                    "(default 20; 0.05 on CPU; 0 leaves it out)")
    ap.add_argument("--ingest-workers", type=int, default=0, help="worker processes (default: cores - 2)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "pass --allow-cpu for a CPU smoke run", file=sys.stderr)
        return 2
    overrides = list(args.override)
    if not cuda:
        overrides.append("embedder.device=cpu")
    cfg = load_pipeline_config(args.profile, overrides)
    if cuda and cfg.embedder.device == "auto":
        cfg.embedder.device = "cuda"
    n_chunks = args.chunks if (cuda or args.chunks != 20000) else 24
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = peak_bf16_tflops(name) if cuda else None

    print(f"bench_gpu: {name}, torch {torch.__version__}, profile {cfg.profile.name} "
          f"(max_batch_tokens {cfg.profile.max_batch_tokens}, max_batch_size {cfg.profile.max_batch_size})")
    corpus = stdlib_corpus(n_chunks, cfg.chunking.chunk_tokens, cfg.chunking.min_chunk_tokens)
    chunks = corpus.chunks
    texts = [c.text for c in chunks]
    print(f"corpus: {len(chunks)} chunks from {len(corpus.docs)} stdlib files "
          f"({sum(c.n_tokens + 2 for c in chunks)} tokens, tokenized again in {corpus.tokenize_s:.2f} s)")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "python": platform.python_version(),
        "profile": cfg.profile.name, "max_batch_tokens": cfg.profile.max_batch_tokens,
        "max_batch_size": cfg.profile.max_batch_size, "length_bucket": cfg.profile.length_bucket,
        "chunks": len(chunks), "tokenize_s": corpus.tokenize_s, "peak_bf16_tflops": peak,
    }

    # 1) the GPU path, with an NVML sampler for the unconstrained memory peak
    embedder = CudaEmbedder(cfg)
    report["embedder"] = embedder.description
    ring = SlabRing(slab_count(cfg.profile, 0, embedder.concurrency), slab_layout(cfg.profile, embedder.max_len))
    base_used = used_now(device.index) if cuda else 0  # context + weights, before any batch
    run_gpu_path(embedder, corpus, cfg, ring)  # warm-up: graphs captured, kernels selected
    sampler = NvmlSampler(device.index) if cuda else None
    if sampler is not None:
        sampler.start()
    run = run_gpu_path(embedder, corpus, cfg, ring)
    peak_used = sampler.stop().max_used if sampler is not None else 0
    ours = run.embeddings
    tok_s = run.real_tokens / run.seconds
    tok_s_with_tok = run.real_tokens / (run.seconds + corpus.tokenize_s)
    achieved = run.flops / run.seconds / 1e12
    report["gpu_path"] = {
        "seconds": run.seconds, "batches": run.batches, "real_tokens": run.real_tokens,
        "padded_tokens": run.padded_tokens, "padding": 1 - run.real_tokens / run.padded_tokens,
        "tokens_per_s": tok_s, "tokens_per_s_incl_tokenize": tok_s_with_tok, "chunks_per_s": len(chunks) / run.seconds,
        "tflops": achieved, "fraction_of_peak": (achieved / peak) if peak else None,
        "metrics": embedder.metrics(), "idle_used_gib": gib(base_used), "peak_used_gib": gib(peak_used),
        "slabs_pinned": ring.pinned,  # staged_inputs in metrics.producer must then be 0: copies straight from slabs
    }
    ring.close()  # page-locked: unregistered now, not at exit, before the next runs pin their own

    # 4) copy/compute overlap on the embed stage alone (with graphs, then eagerly)
    batches, plans = prefilled_batches(corpus, cfg, pin=cuda)
    stage_flops = sum(p.padded_tokens * flops_per_token(p.length) for p in plans)
    ov = overlap(embedder, batches, repeats=2 if cuda else 1, warmups=2 if cuda else 0)
    ov_eager = None
    if embedder.use_graphs:
        embedder.use_graphs = False
        ov_eager = overlap(embedder, batches, repeats=1, warmups=1)
        embedder.use_graphs = True
    stage_tflops = stage_flops / ov["side_stream_s"] / 1e12
    report["overlap"] = {"graphs": ov, "eager": ov_eager, "stage_tflops": stage_tflops,
                         "stage_fraction_of_peak": (stage_tflops / peak) if peak else None,
                         "stage_tokens_per_s": run.real_tokens / ov["side_stream_s"]}
    embedder.close()
    del embedder
    gc.collect()

    # 2) sentence-transformers on the same chunks
    if not args.skip_st:
        st32, t32 = run_st(texts, device, half=False, batch_size=args.st_batch, max_seq_len=cfg.embedder.max_seq_len)
        report["st_fp32"] = {"seconds": t32, "tokens_per_s": run.real_tokens / t32}
        report["quality_vs_st_fp32"] = cos_stats(ours, st32)
        if cuda:
            st16, t16 = run_st(texts, device, half=True, batch_size=args.st_batch, max_seq_len=cfg.embedder.max_seq_len)
            report["st_fp16"] = {"seconds": t16, "tokens_per_s": run.real_tokens / t16,
                                 "cosine_vs_st_fp32": cos_stats(st16, st32)}

    # 5) governor under an artificially low gpu.mem_high
    if cuda and not args.skip_governor:
        torch.cuda.empty_cache()
        gov_run = governed_run(cfg, corpus, device, base_used, peak_used)
        report["governor"] = gov_run

    # 6) end to end, files to Parquet, through the shipped pipeline
    ingest_mb = args.ingest_mb if (cuda or args.ingest_mb != 20.0) else 0.05
    if ingest_mb > 0:
        workers = args.ingest_workers or max(1, (os.cpu_count() or 2) - 2)
        report["ingest"] = run_ingest(args.profile, overrides, ingest_mb, workers)

    summarize(report, args.st_batch)
    text = json.dumps(report, indent=2, default=float)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        print(f"\nJSON written to {args.json}")
    return 0


def run_ingest(profile: str, overrides: list[str], megabytes: float, workers: int) -> dict[str, Any]:
    """`TextParallelPipeline` over ~`megabytes` of stdlib .py files (the benchmarks' corpus builder)."""
    import tempfile

    from hades_gpu.pipelines import TextParallelPipeline

    with tempfile.TemporaryDirectory(prefix="bench-gpu-ingest-") as tmp:
        corpus = Path(tmp) / "corpus"
        sizes = build_corpus(corpus, megabytes, code_share=1.0)
        files = sum(1 for _ in corpus.rglob("*.py"))
        cfg = load_pipeline_config(profile, [*overrides, "isne.enabled=false", "monitoring.progress=off",
                                             f"profile.num_workers={workers}"])
        t0 = time.perf_counter()
        result = TextParallelPipeline(cfg).process_batch([corpus], output=Path(tmp) / "out")
        wall = time.perf_counter() - t0
    m = result.metrics
    em = m.get("embedder_metrics", {})
    return {**metrics_row(m, wall_s=wall), "files": files, "bytes": sum(sizes.values()), "workers": workers,
            "skipped": len(result.skipped), "producer": em.get("producer"),
            "graph_replays": em.get("graph_replays"), "eager_batches": em.get("eager_batches"),
            "note": "wall clock of process_batch: discovery, workers' start, model load, Parquet included"}


def governed_run(cfg: PipelineConfig, corpus: Corpus, device: torch.device, base_used: int, peak_used: int) -> dict[str, Any]:
    """Run the GPU path again with gpu.mem_high half-way between idle (context + weights) and the
    unconstrained run's peak (activations, allocator cache, CUDA graph pool)."""
    embedder = CudaEmbedder(cfg)
    ring = SlabRing(slab_count(cfg.profile, 0, embedder.concurrency), slab_layout(cfg.profile, embedder.max_len))
    torch.cuda.empty_cache()
    idle = used_now(device.index)
    total = torch.cuda.get_device_properties(device).total_memory
    working = max(peak_used - base_used, 256 * 2**20)  # the unconstrained run's working set
    limit = idle + working // 2
    low = idle + working // 4
    gcfg = dataclasses.replace(cfg.gpu, mem_high=min(limit / total, 1.0), mem_low=low / total,
                               poll_interval_s=0.002, min_batch_tokens=min(cfg.gpu.min_batch_tokens, 512))
    governor = MemoryGovernor(gcfg, device.index)
    embedder.governor = governor  # the embedder consults its governor on every call
    embedder.max_wait_s = 2.0  # a wait that cannot end (memory held elsewhere) must not stall the run
    sampler = NvmlSampler(device.index)
    sampler.start()
    run = run_gpu_path(embedder, corpus, cfg, ring, governor=governor)
    sampler.stop()
    samples = np.asarray(sampler.samples, dtype=np.int64)
    m = governor.metrics()
    result = {
        "mem_high": gcfg.mem_high, "mem_low": gcfg.mem_low, "limit_gib": gib(limit), "idle_used_gib": gib(idle),
        "max_used_gib": gib(sampler.max_used), "under_limit": bool(sampler.max_used <= limit),
        "samples": int(samples.size), "share_of_samples_over_limit": float((samples > limit).mean()) if samples.size else None,
        "seconds": run.seconds, "tokens_per_s": run.real_tokens / run.seconds,
        "throttle_events": m["throttle_events"], "wait_seconds": m["wait_seconds"],
        "budget_shrinks": m["budget_shrinks"], "budget_grows": m["budget_grows"], "final_budget": m["budget"],
        "graphs_dropped": embedder.metrics()["graphs_dropped"], "oom_splits": embedder.metrics()["oom_splits"],
        "headroom_wait_timeouts": embedder.metrics()["headroom_wait_timeouts"],
    }
    ring.close()
    embedder.close()
    return result


def summarize(r: dict[str, Any], st_batch: int) -> None:
    g = r["gpu_path"]
    rows = [
        ("device", r["device"]),
        ("embedder", r["embedder"]),
        ("chunks / batches", f"{r['chunks']} / {g['batches']} (padding {100 * g['padding']:.1f}%)"),
        ("GPU path tokens/s", f"{g['tokens_per_s']:,.0f}  ({g['chunks_per_s']:,.0f} chunks/s)"),
        ("GPU path + tokenize tokens/s", f"{g['tokens_per_s_incl_tokenize']:,.0f}"),
    ]
    for key, label in (("st_fp32", "s-t encode fp32"), ("st_fp16", "s-t encode fp16")):
        if key in r:
            t = r[key]["tokens_per_s"]
            rows.append((f"{label} tokens/s (batch {st_batch})",
                         f"{t:,.0f}  -> GPU path {g['tokens_per_s'] / t:.2f}x, incl. tokenize "
                         f"{g['tokens_per_s_incl_tokenize'] / t:.2f}x"))
    if "quality_vs_st_fp32" in r:
        q = r["quality_vs_st_fp32"]
        rows.append(("cosine vs s-t fp32 (min / mean)", f"{q['min']:.5f} / {q['mean']:.5f}"))
    if r["peak_bf16_tflops"]:
        o = r["overlap"]
        rows.append(("bf16 peak (table)", f"{r['peak_bf16_tflops']:.0f} TFLOP/s"))
        rows.append(("achieved, GPU path", f"{g['tflops']:.1f} TFLOP/s = {100 * g['fraction_of_peak']:.1f}% of peak"))
        rows.append(("achieved, embed stage", f"{o['stage_tflops']:.1f} TFLOP/s = {100 * o['stage_fraction_of_peak']:.1f}% of peak"))
    else:
        rows.append(("achieved, GPU path", f"{g['tflops']:.3f} TFLOP/s (no peak figure for this device)"))
    o = r["overlap"]
    for key, label in (("graphs", "overlap (run's config)"), ("eager", "overlap, eager")):
        if o.get(key):
            rows.append((label, f"side streams {o[key]['side_stream_s']:.3f} s vs sync copies "
                                f"{o[key]['sync_copies_s']:.3f} s = {o[key]['speedup']:.2f}x"))
    if "ingest" in r:
        v = r["ingest"]
        rows.append(("end to end (files -> Parquet)", f"{v['tokens_per_s']:,.0f} tokens/s, {v['chunks_per_s']:,.0f} chunks/s "
                                                    f"({v['files']} files, {v['bytes'] / 1e6:.1f} MB, {v['workers']} workers, "
                                                    f"{v['wall_s']:.1f} s, {v['embedder']})"))
    if "governor" in r:
        v = r["governor"]
        rows.append(("governor mem_high / limit", f"{v['mem_high']:.4f} = {v['limit_gib']:.2f} GiB "
                                                   f"(idle {v['idle_used_gib']:.2f} GiB)"))
        rows.append(("governor max used", f"{v['max_used_gib']:.2f} GiB ({'under' if v['under_limit'] else 'OVER'} the limit; "
                                           f"{100 * (v['share_of_samples_over_limit'] or 0):.1f}% of {v['samples']} samples over)"))
        rows.append(("governor counters", f"throttles {v['throttle_events']}, waits {v['wait_seconds']:.2f} s, "
                                           f"budget -{v['budget_shrinks']}/+{v['budget_grows']}, "
                                           f"{v['tokens_per_s']:,.0f} tokens/s"))
    print_table(rows, f"bench_gpu {r['date']}")
