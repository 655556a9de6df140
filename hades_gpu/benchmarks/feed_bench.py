"""The feed benchmark: the shipped pipeline with the model replaced by a zero-cost stand-in.

What it measures is everything on the CPU side of the embedder — discovery, worker processes
reading, chunking and tokenizing, the batcher, the queues and the Parquet writer — on real text and
code (`benchmarks.corpus`), for 1..N worker processes, against HF `tokenizers` `encode_batch` on the
same files with the same number of threads, in the same run:

  * feed: `TextParallelPipeline(config, embedder=ZeroCostEmbedder()).process_batch([corpus], output=fresh)`
    with `config = load_pipeline_config(profile)` and `config.profile.num_workers = n` (the public API
    only). tokens/s = sum of `n_tokens` of the chunks written (read back with `hades_gpu.store.reader`)
    / wall time of `process_batch` (worker start-up included). Chunk tokens count the chunker's
    overlap twice, so the byte rate (MB/s of the files ingested) is reported beside it.
  * HF baseline: `load_tokenizer().encode_batch(texts, add_special_tokens=False)` on the same files'
    decoded texts (read beforehand; only the encode is timed), in a fresh subprocess per n with
    `RAYON_NUM_THREADS=n` (tokenizers 0.2x's rayon pool reads it at start-up; `RAYON_RS_NUM_CPUS`, the
    old name, is honoured too and set as well) and `TOKENIZERS_PARALLELISM=true`.
  * main process CPU: `getrusage(RUSAGE_SELF)` delta over `process_batch` (all its threads) / wall, as
    % of one core; children (`workers_cpu_*`: the workers, and the writer process where there is
    one): `getrusage(RUSAGE_CHILDREN)` delta (they are reaped when the run returns).

Every result carries `LABEL`: the embedder is not a model and its vectors mean nothing.

  * writer: `profile.writer` as the run resolved it; `--writers thread,process` runs each worker
    count with the Parquet writer as a thread of the main process and as a process of its own
    (`orchestration.writer_process`), the HF baseline measured once per count for both.

Usage: python scripts/bench_feed.py [--corpus-mb 12] [--workers 1..N] [--profile balanced]
                                    [--writers thread,process] [--repeat 3] [--out docs/bench_feed.json]
       hades-bench bench=feed corpus=DIR profile.num_workers=2      (one n per Hydra job)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

LABEL = "ZERO-COST STAND-IN (no model): measures the feed only"
HF_THREAD_ENV = ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS")


class ZeroCostEmbedder:
    """Implements the `Embedder` protocol without a model: rows are copied from a fixed pool of random
    unit vectors.

    Looks at nothing but the batch's shape, so the pipeline around it is all that is timed. The pool
    gives the writer bytes as hard to compress as a model's (zstd saves ~8% on both MiniLM's vectors
    and these): a constant row, as this stand-in first returned, compressed to nothing and hid what
    encoding real vectors costs. Consecutive rows never repeat within `POOL_ROWS` (more rows than a
    Parquet page holds). Not an embedding: its output is labelled `LABEL` wherever it appears.
    """

    POOL_ROWS = 4099  # prime: row i of the run is pool row i mod 4099

    def __init__(self, dim: int = 384, concurrency: int = 1, max_batch_size: int = 0) -> None:
        self.dim = dim
        self.concurrency = concurrency
        self.max_batch_size = max_batch_size
        self.description = LABEL
        pool = np.random.default_rng(0).standard_normal((self.POOL_ROWS, dim)).astype(np.float32)
        self._pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)  # L2 norm 1, as the model's
        self.calls = 0
        self.rows = 0

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        b = int(np.shape(input_ids)[0])
        start = self.rows % self.POOL_ROWS
        self.calls += 1
        self.rows += b
        return self._pool.take(np.arange(start, start + b) % self.POOL_ROWS, axis=0)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# corpus files
# ------------------------------------------------------------------------------------------------
def corpus_files(corpus: Path) -> list[Path]:
    """Every regular file under `corpus` (or `corpus` itself), sorted."""
    corpus = Path(corpus)
    if corpus.is_file():
        return [corpus]
    return sorted(p for p in corpus.rglob("*") if p.is_file() and not p.is_symlink())


def _ingested_paths(output: Path) -> list[Path]:
    from hades_gpu.store.reader import read_chunks

    return sorted({Path(p) for p in read_chunks(output, ["path"]).column("path").to_pylist()})


# ------------------------------------------------------------------------------------------------
# the feed: the shipped pipeline with the stand-in
# ------------------------------------------------------------------------------------------------
def _cpu_s(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def feed_run(cfg: Any, corpus: Path, output: Path, workers: Optional[int] = None) -> dict[str, Any]:
    """One timed `process_batch` of `corpus` into a fresh `output` with the stand-in embedder.

    `cfg` is a `PipelineConfig` (e.g. `load_pipeline_config(profile)`); `workers` sets
    `cfg.profile.num_workers`. ISNE is switched off (it is not the feed).
    """
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.store.reader import read_chunks

    if workers is not None:
        cfg.profile.num_workers = int(workers)
    cfg.isne.enabled = False
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    embedder = ZeroCostEmbedder(max_batch_size=int(cfg.profile.max_batch_size))
    self0, children0 = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = TextParallelPipeline(cfg, embedder=embedder).process_batch([str(corpus)], output=str(output))
    wall = time.perf_counter() - t0
    main_cpu = _cpu_s(resource.RUSAGE_SELF) - self0
    workers_cpu = _cpu_s(resource.RUSAGE_CHILDREN) - children0

    table = read_chunks(output, ["n_tokens", "path"])
    tokens = int(sum(table.column("n_tokens").to_pylist()))
    paths = sorted(set(table.column("path").to_pylist()))
    nbytes = sum(Path(p).stat().st_size for p in paths)
    chunks = table.num_rows
    metrics = result.metrics or {}
    memory = metrics.get("memory") or {}
    return {
        "label": LABEL,
        "embedder": embedder.description,
        "profile": cfg.profile.name,
        "workers": int(cfg.profile.num_workers),
        "documents": int(result.documents_ingested),
        "documents_skipped": len(result.skipped),
        "skip_reasons": sorted({str(s.get("reason")) for s in result.skipped}),
        "chunks": int(chunks),
        "chunks_written": int(result.chunks_written),
        "tokens": tokens,
        "bytes": int(nbytes),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "chunks_per_s": chunks / wall if wall > 0 else 0.0,
        "mb_per_s": nbytes / 1e6 / wall if wall > 0 else 0.0,
        "main_cpu_s": main_cpu,
        "main_cpu_pct_of_core": 100.0 * main_cpu / wall if wall > 0 else 0.0,
        "workers_cpu_s": workers_cpu,
        "workers_cpu_pct_of_core": 100.0 * workers_cpu / wall if wall > 0 else 0.0,
        "writer": str(metrics.get("writer", "")),  # profile.writer as the run resolved it: thread | process
        "peak_rss_bytes": int(memory.get("peak_rss_bytes", 0) or 0),
        "padding_efficiency": float(metrics.get("padding_efficiency", 1.0) or 1.0),
        "embed_calls": embedder.calls,
        "rows_embedded": embedder.rows,
        "paths": paths,
    }


# ------------------------------------------------------------------------------------------------
# the HF baseline, in a fresh process per thread count
# ------------------------------------------------------------------------------------------------
def _hf_child(list_file: Path) -> dict[str, Any]:
    """Runs in the child: read the files (untimed), encode_batch them (timed), count tokens."""
    from hades_gpu.documents.tokenizer import load_tokenizer

    files = [Path(line) for line in list_file.read_text().splitlines() if line]
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    tok = load_tokenizer()
    tok.encode_batch(texts[: min(8, len(texts))], add_special_tokens=False)  # starts the thread pool
    cpu0, t0 = time.process_time(), time.perf_counter()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    tokens = sum(len(e.ids) for e in encodings)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"files": len(files), "tokens": tokens, "bytes": nbytes, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "mb_per_s": nbytes / 1e6 / seconds if seconds > 0 else 0.0,
            "cpu_s": cpu, "threads_busy": cpu / seconds if seconds > 0 else 0.0,
            "env": {k: os.environ.get(k) for k in (*HF_THREAD_ENV, "TOKENIZERS_PARALLELISM")}}


def hf_baseline(files: Sequence[Path], threads: int, workdir: Path) -> dict[str, Any]:
    """HF `tokenizers` `encode_batch` on `files` with `threads` threads, in a fresh subprocess."""
    workdir.mkdir(parents=True, exist_ok=True)
    list_file = workdir / f"hf-files-{threads}.txt"
    list_file.write_text("\n".join(str(f) for f in files) + "\n")
    env = dict(os.environ)
    env.update({k: str(threads) for k in HF_THREAD_ENV})
    env["TOKENIZERS_PARALLELISM"] = "true"
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "-m", "hades_gpu.benchmarks.feed_bench", "--hf-child", str(list_file)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"HF baseline ({threads} threads) failed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["threads"] = threads
    return out


# ------------------------------------------------------------------------------------------------
# one n: feed + baseline
# ------------------------------------------------------------------------------------------------
def _warm_corpus(corpus: Path, dest: Path, n_files: int = 6) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for i, f in enumerate(corpus_files(corpus)[:n_files]):
        shutil.copyfile(f, dest / f"{i:02d}_{f.name}")
    return dest


def measure(cfg: Any, corpus: Path, workers: int, workdir: Path, warm_up: bool = True,
            keep_output: bool = False, hf: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Feed (stand-in) and HF baseline for one worker/thread count; the ratios between them. `hf`:
    a baseline this run measured already for this count (it is the same for every writer)."""
    import copy

    workdir = Path(workdir)
    if warm_up:  # imports, first spawn: not what the worker count changes
        feed_run(copy.deepcopy(cfg), _warm_corpus(corpus, workdir / "warm-corpus"), workdir / "warm-out", 1)
        shutil.rmtree(workdir / "warm-out", ignore_errors=True)
    out = workdir / f"out-{workers}"
    feed = feed_run(copy.deepcopy(cfg), corpus, out, workers)
    paths = feed.pop("paths")
    if hf is None:
        hf = hf_baseline([Path(p) for p in paths], workers, workdir)
    if not keep_output:
        shutil.rmtree(out, ignore_errors=True)
    row = {**feed, "hf": hf,
           "x_hf_tokens": feed["tokens_per_s"] / hf["tokens_per_s"] if hf["tokens_per_s"] else 0.0,
           "x_hf_bytes": feed["mb_per_s"] / hf["mb_per_s"] if hf["mb_per_s"] else 0.0}
    return row


def job_feed(cfg: Any, bench: Any, job_dir: Path) -> dict[str, Any]:
    """`hades-bench bench=feed`: `measure` at `profile.num_workers` workers (sweep it with `-m`);
    the dataset goes to `job_dir/dataset` (kept with `bench.keep_dataset=true`)."""
    job_dir = Path(job_dir)
    work = job_dir / "feed-work"  # jobs.FEED_WORK_DIR (checked by jobs.check_job_folder)
    corpus = Path(str(cfg.corpus))
    n = int(cfg.profile.num_workers)
    import copy

    feed_run(copy.deepcopy(cfg), _warm_corpus(corpus, work / "warm-corpus"), work / "warm-out", 1)
    feed = feed_run(cfg, corpus, job_dir / "dataset", n)
    paths = feed.pop("paths")
    hf = hf_baseline([Path(p) for p in paths], n, work)
    shutil.rmtree(work, ignore_errors=True)
    return {**feed, "hf": hf, "embedder_name": LABEL,  # run_job's default names the configured model
            "x_hf_tokens": feed["tokens_per_s"] / hf["tokens_per_s"] if hf["tokens_per_s"] else 0.0,
            "x_hf_bytes": feed["mb_per_s"] / hf["mb_per_s"] if hf["mb_per_s"] else 0.0}


# ------------------------------------------------------------------------------------------------
# table + JSON
# ------------------------------------------------------------------------------------------------
HEADER = ("workers", "writer", "feed tok/s", "HF tok/s", "x HF (tokens)", "x HF (bytes)", "feed chunks/s", "feed MB/s",
          "main CPU % core", "children CPU % core", "peak RSS MiB", "embedder")


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        n = f"**{r['workers']}**" if r["workers"] == 2 else str(r["workers"])
        ratio = f"{r['x_hf_tokens']:.2f}"
        if r["workers"] == 2:
            ratio = f"**{ratio}**"
        cells = (n, r.get("writer", ""), f"{r['tokens_per_s']:,.0f}", f"{r['hf']['tokens_per_s']:,.0f}", ratio, f"{r['x_hf_bytes']:.2f}",
                 f"{r['chunks_per_s']:,.0f}", f"{r['mb_per_s']:.2f}", f"{r['main_cpu_pct_of_core']:.0f}",
                 f"{r['workers_cpu_pct_of_core']:.0f}", f"{r['peak_rss_bytes'] / 2**20:.0f}", LABEL)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worker_counts(spec: str) -> list[int]:
    """`"1..4"`, `"1,2,4"` or `""` (1..os.cpu_count())."""
    if not spec:
        return list(range(1, (os.cpu_count() or 1) + 1))
    if ".." in spec:
        a, b = spec.split("..")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in spec.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help="an existing corpus (default: build one of --corpus-mb)")
    ap.add_argument("--corpus-mb", type=float, default=12.0)
    ap.add_argument("--small-files", type=int, default=0, metavar="MAX_BYTES",
                    help="build the corpus from real files of at most MAX_BYTES each (benchmarks.corpus."
                         "build_small_files_corpus): per-document costs (default 0: build_corpus's files)")
    ap.add_argument("--workers", default="", help="'1..N' or '1,2,4' (default 1..os.cpu_count())")
    ap.add_argument("--profile", default="balanced")
    ap.add_argument("--writers", default="", help="'thread,process': each worker count with each profile.writer "
                                                   "(default: the profile's own)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (workers, writer), interleaved")
    ap.add_argument("--override", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hades-bench-feed")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_feed.json"))
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'before the rewrite')")
    args = ap.parse_args(argv)

    if args.hf_child:
        print(json.dumps(_hf_child(args.hf_child)))
        return

    from hades_gpu.config import load_pipeline_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        corpus, sizes = args.corpus, {"total": sum(f.stat().st_size for f in corpus_files(args.corpus))}
    elif args.small_files:
        from hades_gpu.benchmarks.corpus import build_small_files_corpus

        corpus = work / "corpus-small"
        sizes = build_small_files_corpus(corpus, args.corpus_mb, args.small_files)
    else:
        from hades_gpu.benchmarks.corpus import build_corpus

        corpus = work / "corpus"
        sizes = build_corpus(corpus, args.corpus_mb)
    total = sum(v for k, v in sizes.items() if k != "total") or sizes.get("total", 0)
    print(f"corpus: {total / 1e6:.2f} MB in {corpus}; embedder: {LABEL}", flush=True)

    rows = []
    writers = [w for w in args.writers.split(",") if w] or [None]
    for i, n in enumerate(_worker_counts(args.workers)):
        hf = None
        for rep in range(max(1, args.repeat)):  # writers interleaved: a slow spell of the box hits both
            for writer in writers:
                writer_override = [f"profile.writer={writer}"] if writer else []
                cfg = load_pipeline_config(profile=args.profile, overrides=[
                    "isne.enabled=false", "monitoring.progress=off", *args.override, *writer_override])
                print(f"feed with {n} worker(s), writer {cfg.profile.writer} + HF encode_batch with {n} thread(s) ...",
                      flush=True)
                row = measure(cfg, corpus, n, work, warm_up=(i == 0 and rep == 0 and writer == writers[0]), hf=hf)
                hf = row["hf"]
                rows.append(row)
    text = table(rows)
    print()
    print(text)
    result = {
        "label": LABEL,
        "note": args.note,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "profile": args.profile,
        "overrides": args.override,
        "corpus": str(corpus),
        "small_files_max_bytes": args.small_files or None,
        "corpus_bytes": sizes,
        "hf_thread_env": list(HF_THREAD_ENV),
        "targets": {"x_hf_tokens_at_2_workers": 2.0, "main_cpu_pct_of_core_max": 20.0},
        "runs": rows,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
