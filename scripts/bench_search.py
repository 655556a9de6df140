#!/usr/bin/env python3
"""Issue 16's figures in one run: the minilm_text ensemble against `embedder=local`, and `hades-search`
on an ingest of standard-library modules.

1. ingest `--corpus-kb` of stdlib modules (local embedder, graph + ISNE);
2. 50 docstring queries built from that corpus (`retrieval.evaluation`): top-10 hit rate and latency
   per query, local embedder (expand none/graph/isne) and Triton (`minilm_text`);
3. a real tritonserver serving minilm_text: cosine of its vectors against the local embedder's on
   prose from /usr/share/doc (the docs corpus) and stdlib code; a concurrent tritonclient load
   generator (`--clients` threads) and, when it runs here, perf_analyzer with BYTES `--input-data`;
   merged executions read from the server's statistics API (execution_count < inference_count).

Prints a table, writes JSON (`--json`). The box may be shared: read ratios and counts, not rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from hades_gpu.config import load_pipeline_config  # noqa: E402
from hades_gpu.embedding.export import local_text_chunks  # noqa: E402
from hades_gpu.embedding.factory import build_embedder  # noqa: E402
from hades_gpu.embedding.triton import embedder_for  # noqa: E402
from hades_gpu.embedding.triton_server import TritonServer  # noqa: E402
from hades_gpu.pipelines import TextParallelPipeline  # noqa: E402
from hades_gpu.retrieval.evaluation import docstring_queries, hit_rate, spread  # noqa: E402
from hades_gpu.retrieval.search import Searcher  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODELS = ("minilm_tokenizer", "minilm_python")


def stdlib_corpus(kb: int, dest: Path) -> list[Path]:
    """Top-level stdlib modules of 4-40 KB, every other one by name, until `kb` KB: a spread of topics."""
    files = [p for p in sorted(STDLIB.glob("*.py")) if 4_000 <= p.stat().st_size <= 40_000][::2]
    dest.mkdir(parents=True, exist_ok=True)
    total, out = 0, []
    for p in files:
        if total >= kb * 1000:
            break
        shutil.copy(p, dest / p.name)
        out.append(dest / p.name)
        total += p.stat().st_size
    return out


def doc_files() -> list[Path]:
    doc = Path("/usr/share/doc")
    return [p for p in sorted(doc.glob("*/*")) if p.is_file()
            and (p.name.lower().startswith(("readme", "changelog", "news", "copyright"))
                 or p.name.lower().endswith((".txt", ".md", ".rst")))]


def stats(url: str, model: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        s = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return sum(x.inference_count for x in s), sum(x.execution_count for x in s)


def merged(url: str, run) -> dict:
    """Run `run()`, return each step's (inferences, executions) delta from the statistics API."""
    before = {m: stats(url, m) for m in MODELS}
    info = run()
    out = {"run": info}
    for m in MODELS:
        inf, ex = (a - b for a, b in zip(stats(url, m), before[m]))
        out[m] = {"inferences": inf, "executions": ex, "merged": ex < inf}
    return out


def load_generator(url: str, clients: int, per_client: int, texts: list[str]) -> dict:
    """`clients` threads, each its own client with one request in flight, one string a request."""
    embs = [embedder_for(url, "minilm_python", max_inflight=1) for _ in range(clients)]
    barrier = threading.Barrier(clients)
    lat: list[float] = []

    def client(k: int) -> None:
        barrier.wait()
        for j in range(per_client):
            t = time.perf_counter()
            embs[k].embed_texts([texts[(k * per_client + j) % len(texts)]])
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    for e in embs:
        e.close()
    return {"clients": clients, "requests": clients * per_client, "wall_s": wall,
            "req_per_s": clients * per_client / wall, "p50_ms": float(np.median(lat))}


def perf_analyzer(url: str, texts: list[str], workdir: Path, concurrency: int, request_count: int = 160) -> dict:
    """perf_analyzer on minilm_text with BYTES --input-data, or why it cannot run here."""
    exe = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(exe).is_file():
        return {"ran": False, "why": "no perf_analyzer binary"}
    data = workdir / "pa_text.json"
    data.write_text(json.dumps({"data": [{"text": [t]} for t in texts]}))
    env = dict(os.environ)
    try:  # perf_analyzer links libcudart.so.12 even on a CPU box (extra `perf`)
        import nvidia.cuda_runtime as cr

        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(Path(list(cr.__path__)[0]) / "lib"), env.get("LD_LIBRARY_PATH", "")])
    except ImportError:
        pass
    cmd = [exe, "-m", "minilm_text", "-i", "grpc", "-u", url, "--input-data", str(data), "-b", "1",
           "--concurrency-range", f"{concurrency}:{concurrency}",
           # a fixed number of requests, not windows until stable: a shared 2-core box never is
           "--request-count", str(request_count)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    if proc.returncode != 0:
        return {"ran": False, "why": f"exit {proc.returncode}: {' | '.join(tail[-3:])}", "command": " ".join(cmd)}
    return {"ran": True, "command": " ".join(cmd), "summary": tail, "requests": request_count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-kb", type=int, default=250)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("docs/bench_search.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    result: dict = {"load_avg_start": os.getloadavg()[0], "cores": len(os.sched_getaffinity(0))}
    try:
        cfg = load_pipeline_config("balanced", ["monitoring.progress=off"])
        embedder = build_embedder(cfg)
        files = stdlib_corpus(args.corpus_kb, work / "corpus")
        t0 = time.perf_counter()
        ing = TextParallelPipeline(cfg, embedder=embedder).process_batch([work / "corpus"], output=work / "out")
        result["ingest"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
                            "chunks": ing.chunks_written, "wall_s": time.perf_counter() - t0}
        queries = spread(docstring_queries(files), args.queries)
        result["queries"] = len(queries)
        rows = []
        with Searcher(work / "out", cfg, embedder=embedder) as local:
            local.search("warm up")  # the runtime's first call at a new shape
            for expand in ("none", "graph", "isne"):
                r = hit_rate(local, queries, k=10, expand=expand)
                rows.append({"embedder": "local", **r.as_dict()})
        server = TritonServer(models=["minilm_python", "minilm_text"], log_file=work / "tritonserver.log").start()
        try:
            url = server.grpc_url
            tcfg = load_pipeline_config("balanced", ["embedder=triton", f"embedder.url={url}"])
            with Searcher(work / "out", tcfg) as remote:
                remote.search("warm up")
                r = hit_rate(remote, queries, k=10)
                rows.append({"embedder": "triton (minilm_text)", **r.as_dict()})
            result["search"] = rows
            # cosine: docs prose and stdlib code, strings through the ensemble vs the local embedder
            docs = local_text_chunks(48, chunk_tokens=200, seed=11, files=doc_files())
            code = local_text_chunks(16, chunk_tokens=254, seed=12)
            shorts = [q.query for q in queries[:16]]
            remote_emb = embedder_for(url, "minilm_python")
            cos = {}
            for name, texts in (("docs prose (/usr/share/doc)", docs), ("stdlib code", code), ("queries", shorts)):
                c = np.sum(remote_emb.embed_texts(texts) * embedder.embed_texts(texts), axis=1)
                cos[name] = {"n": len(texts), "min": float(c.min()), "mean": float(c.mean())}
            remote_emb.close()
            result["cosine_vs_local"] = cos
            strings = [q.query for q in queries]
            result["load_generator"] = merged(url, lambda: load_generator(url, args.clients, 10, strings))
            result["perf_analyzer"] = merged(url, lambda: perf_analyzer(url, strings, work, args.clients))
        finally:
            server.stop()
        embedder.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()[0]

    print(f"\ningest: {result['ingest']['files']} stdlib modules, {result['ingest']['bytes'] / 1000:.0f} KB, "
          f"{result['ingest']['chunks']} chunks, {result['ingest']['wall_s']:.1f} s")
    print(f"\n| embedder | expand | top-10 hits | rate | ms/query (mean) | p50 ms |\n|---|---|---|---|---|---|")
    for r in result["search"]:
        print(f"| {r['embedder']} | {r['expand']} | {r['hits']}/{r['queries']} | {r['rate']:.0%} | "
              f"{r['ms_per_query']:.1f} | {r['p50_ms']:.1f} |")
    print("\n| text | n | cosine min | cosine mean |\n|---|---|---|---|")
    for name, c in result["cosine_vs_local"].items():
        print(f"| {name} | {c['n']} | {c['min']:.6f} | {c['mean']:.6f} |")
    print("\n| load | requests | tokenizer inferences / executions | minilm_python inferences / executions |\n|---|---|---|---|")
    for name in ("load_generator", "perf_analyzer"):
        m = result[name]
        label = name if name != "perf_analyzer" or m["run"].get("ran") else f"perf_analyzer (did not run: {m['run'].get('why')})"
        reqs = m["run"].get("requests", "")
        print(f"| {label} | {reqs} | {m['minilm_tokenizer']['inferences']} / {m['minilm_tokenizer']['executions']} | "
              f"{m['minilm_python']['inferences']} / {m['minilm_python']['executions']} |")
    if result["perf_analyzer"]["run"].get("ran"):
        print("\nperf_analyzer:\n  " + "\n  ".join(result["perf_analyzer"]["run"]["summary"]))
    print(f"\nload average {result['load_avg_start']:.1f} -> {result['load_avg_end']:.1f} on {result['cores']} cores")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
