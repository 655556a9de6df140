"""`hades-bench`: one benchmark job on `corpus=`, its `result.json` in the Hydra job's output folder.

The job is chosen by the `bench` group (`conf/bench/`):

- ``ingest``: the whole main job (discover -> chunk -> batch -> embed -> write) into a fresh
  `dataset/` folder. The embedder is built and warmed up before the clock starts, so model loading
  (a constant per job) does not swamp what the profile changes. ISNE is off (it has its own job).
- ``embed_only``: the corpus is chunked first (untimed, in this process), then batched with the
  profile's token budget and embedded with the embedder's own concurrency (timed).
- ``triton``: ``ingest`` with the Triton embedder; a tritonserver is started for the job on
  127.0.0.1 unless ``bench.triton_url`` names a running one.
- ``isne``: the corpus is ingested (untimed, ISNE off), then the ISNE stage (graph + training +
  inference) runs on the dataset (timed).
- ``graph``: the corpus is ingested (untimed), then the kNN rows (`benchmarks.knn_bench`): ANN build
  + query-all and recall@k on its real chunks and on SYNTHETIC vectors of `bench.knn_sizes`, exact
  blocked search as the baseline.
- ``feed``: the whole main job with a ZERO-COST STAND-IN for the model (`benchmarks.feed_bench`) at
  `profile.num_workers` workers, and HF `tokenizers` `encode_batch` on the same files with as many
  threads: the CPU side's rate and the main process's CPU share.

`hades-bench -m profile=high_throughput,balanced,low_memory profile.max_batch_tokens=4096,16384 corpus=DIR`
runs the grid (one folder per job under `output=` or `multirun/<time>`); `hades-report <that folder>`
compares the jobs. With `hydra/launcher=joblib_2` (conf/hydra/launcher/) jobs run in parallel, and
on a host with several GPUs each job is pinned to GPU `hydra.job.num mod n`.

Benchmark hygiene (nanoGPT's bench.py): warm up first, time only the region that the swept
settings change, and synchronise the device around it (the embedders return host arrays, so every
`embed()` call has already waited for the GPU when it returns).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hades_gpu.benchmarks.config import JOBS, BenchConfig, register_bench_configs
from hades_gpu.benchmarks.rows import metrics_row
from hades_gpu.config import (ConfigError, PipelineConfig, conf_dir, config_to_dict, name_profile, register_configs,
                              to_pipeline_config)

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DATASET_DIR = "dataset"

# ------------------------------------------------------------------------------------------------
# GPU pinning for parallel jobs on one host
# ------------------------------------------------------------------------------------------------
_PINNED_TO: Optional[str] = None  # the GPU this process narrowed CUDA_VISIBLE_DEVICES to
_ORIGINAL_VISIBLE: Optional[list[str]] = None  # the GPU list this process started with


def visible_gpus() -> list[str]:
    """GPUs this process may use, as CUDA_VISIBLE_DEVICES entries; [] without a driver.

    Reads `CUDA_VISIBLE_DEVICES` when set, else counts devices with NVML (which, unlike
    `torch.cuda.device_count()`, does not initialise CUDA, so the variable can still be changed).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no driver, no device: no GPU to pin  # noqa: BLE001
        return []


def choose_gpu(job_num: int, gpus: Sequence[str]) -> Optional[tuple[int, str]]:
    """`(index, CUDA_VISIBLE_DEVICES entry)` for job `job_num`: round-robin over `gpus`; None when
    there are fewer than two (nothing to spread)."""
    if len(gpus) < 2:
        return None
    k = job_num % len(gpus)
    return k, gpus[k]


def pin_job_gpu(cfg: PipelineConfig, job_num: int) -> Optional[str]:
    """Pin this job to GPU `job_num mod n` when several are visible; returns what was done (or None).

    In a process that has not imported torch yet, `CUDA_VISIBLE_DEVICES` is narrowed to that one
    GPU (torch, cupy and a Triton server started by the job all honour it). A process that already
    holds CUDA (joblib's loky workers are reused across jobs) cannot change its view any more: there
    the device fields of `cfg` are set to `cuda:<k>` instead, or, if this process was narrowed by an
    earlier job, the job stays on that GPU (logged).
    """
    global _PINNED_TO, _ORIGINAL_VISIBLE
    if _ORIGINAL_VISIBLE is None:
        _ORIGINAL_VISIBLE = visible_gpus()
    pick = choose_gpu(job_num, _ORIGINAL_VISIBLE)
    if pick is None:
        return None
    k, physical = pick
    if _PINNED_TO is not None:
        if _PINNED_TO != physical:
            log.warning("job %d: this worker process is already bound to GPU %s (wanted %s); running there",
                        job_num, _PINNED_TO, physical)
        return f"CUDA_VISIBLE_DEVICES={_PINNED_TO}"
    if "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = physical
        _PINNED_TO = physical
        return f"CUDA_VISIBLE_DEVICES={physical}"
    device = f"cuda:{k}"
    for section in (cfg.embedder, cfg.gpu, cfg.graph, cfg.isne):
        if section.device == "auto":
            section.device = device
    return f"device={device}"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _warm_up(embedder: Any, batches: int, max_seq_len: int) -> None:
    """Run `batches` small batches so lazy compilation, allocators and caches are settled."""
    from hades_gpu.documents.tokenizer import special_ids

    cls_id, sep_id, _ = special_ids()
    length = min(128, max_seq_len)
    ids = np.full((8, length), 1000, dtype=np.int64)
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    mask = np.ones_like(ids)
    for _ in range(batches):
        embedder.embed(ids, mask)


class _Sampler:
    """Peak RSS of this process and its children over a region (the monitoring module's sampler)."""

    def __enter__(self) -> Any:
        from hades_gpu.orchestration.monitoring import PeakMemorySampler

        self.sampler = PeakMemorySampler().start()
        return self.sampler

    def __exit__(self, *exc: object) -> None:
        self.sampler.stop()


FEED_WORK_DIR = "feed-work"  # benchmarks.feed_bench's scratch folder in the job folder


def is_bench_result(row: Any) -> bool:
    """A job's result as `run_job` and `write_failed_result` write it: the job's name and its status
    (a user's own `result.json`, `{"acc": 1}`, is none: the report made a row of it)."""
    return isinstance(row, dict) and isinstance(row.get("job"), str) and isinstance(row.get("status"), str)


def _holds_a_bench_result(path: Path) -> bool:
    try:
        return is_bench_result(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def check_bench_folder(folder: Path, corpus: str) -> None:
    """Refuse a bench output (one job's folder, or a sweep's) that is an ingest output (its
    metrics.json and .hydra/ were replaced) or lies inside the corpus (every job ingested the bench's
    own files: result.json, metrics.json, earlier jobs' folders)."""
    from hades_gpu.records import path_within
    from hades_gpu.store.reader import is_ingest_output

    if is_ingest_output(folder):
        raise ConfigError(f"{folder} is an ingest output: hades-bench writes its own result.json, metrics.json and "
                          f"{DATASET_DIR}/ into output= and would replace that output's; give it a folder of its own")
    here, corpus_real = os.path.realpath(folder), os.path.realpath(corpus)
    if here == corpus_real or path_within(here, corpus_real):
        raise ConfigError(f"output {folder} is inside the corpus {corpus}: every job would ingest the bench's own files "
                          f"(result.json, metrics.json, earlier jobs' folders); give an output outside the corpus")


def check_job_folder(job_dir: Path, corpus: str) -> None:
    """Refuse a job folder whose contents the job would replace or ingest, before anything is
    written (`check_bench_folder`). A job also replaces its `dataset/` (and `feed-work/`) each run: a
    `dataset/` of the user's was deleted, the corpus itself when it was that folder."""
    from hades_gpu.records import path_within

    check_bench_folder(job_dir, corpus)
    corpus_real = os.path.realpath(corpus)
    made_by_bench = _holds_a_bench_result(job_dir / RESULT_FILE)
    for name in (DATASET_DIR, FEED_WORK_DIR):
        folder = job_dir / name
        inside = os.path.realpath(folder)
        if corpus_real == inside or path_within(corpus_real, inside):
            raise ConfigError(f"the corpus {corpus} is {folder} or inside it, which hades-bench replaces each run: give "
                              f"the bench another output=")
        if os.path.lexists(folder) and not made_by_bench:
            raise ConfigError(f"{folder} exists and hades-bench did not make it (no {RESULT_FILE} beside it): a job "
                              f"replaces <output>/{name} each run; move it, or give hades-bench another output=")


def _fresh_dir(path: Path) -> Path:
    """An empty folder: a benchmark never resumes into an earlier run's output."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _ingest(cfg: PipelineConfig, corpus: str, out: Path, bench: BenchConfig) -> dict[str, Any]:
    """Build + warm the embedder (untimed), then ingest `corpus` into a fresh `out` (timed by the
    pipeline's own metrics: discovery to the last committed part)."""
    from hades_gpu.embedding.factory import build_embedder
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    embedder = build_embedder(cfg)
    try:
        _warm_up(embedder, bench.warmup_batches, cfg.embedder.max_seq_len)
        result = TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=_fresh_dir(out))
    finally:
        embedder.close()
    fields = metrics_row(result.metrics)
    fields["embedder"] = fields["embedder"] or str(getattr(embedder, "description", ""))
    return fields


# ------------------------------------------------------------------------------------------------
# the four jobs
# ------------------------------------------------------------------------------------------------
def job_ingest(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    cfg.isne.enabled = False
    return _ingest(cfg, str(cfg.corpus), job_dir / DATASET_DIR, bench)


def job_triton(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    cfg.isne.enabled = False
    cfg.embedder.name = "triton"
    if bench.triton_url:
        cfg.embedder.url = bench.triton_url
        fields = _ingest(cfg, str(cfg.corpus), job_dir / DATASET_DIR, bench)
        fields["triton_url"] = bench.triton_url
        return fields
    from hades_gpu.embedding.triton_server import TritonServer

    with TritonServer(models=[cfg.embedder.model], log_file=job_dir / "tritonserver.log",
                      ready_timeout_s=bench.triton_ready_timeout_s) as server:
        cfg.embedder.url = server.grpc_url
        fields = _ingest(cfg, str(cfg.corpus), job_dir / DATASET_DIR, bench)
    fields["triton_url"] = "started by the job"
    return fields


def job_embed_only(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    """Chunk (untimed, in this process), then the shipped embed stage over the chunked documents
    (timed: `benchmarks.stage.embed_documents`, the pipeline's batcher, ring, queues, threads)."""
    from hades_gpu.benchmarks.stage import embed_documents
    from hades_gpu.documents.chunking import process_document
    from hades_gpu.documents.discovery import discover
    from hades_gpu.embedding.factory import build_embedder

    refs, skips = discover([str(cfg.corpus)], cfg.documents)
    docs = [d for d in (process_document(ref, cfg.documents, cfg.chunking) for ref in refs)
            if d.skip_reason is None and d.chunks]
    with _Sampler() as memory:
        embedder = build_embedder(cfg)
        try:
            _warm_up(embedder, bench.warmup_batches, cfg.embedder.max_seq_len)
            run = embed_documents(cfg, docs, embedder)
            description = str(getattr(embedder, "description", type(embedder).__name__))
            workers = max(1, int(getattr(embedder, "concurrency", 1)))
        finally:
            embedder.close()
    row = metrics_row({**run.metrics, "documents": {"done": len(docs), "skipped": len(skips) + len(refs) - len(docs)},
                       "chunks": sum(len(d.chunks) for d in docs), "wall_s": run.seconds})
    row.update(peak_rss_bytes=memory.peak_rss, embedder=description, embed_concurrency=workers)
    return row


def job_isne(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    """Ingest (untimed, ISNE off), then time the ISNE stage on the dataset."""
    from hades_gpu.isne.stage import run_isne_stage

    out = job_dir / DATASET_DIR
    ingest_cfg = dataclasses.replace(cfg, isne=dataclasses.replace(cfg.isne, enabled=False))
    ingested = _ingest(ingest_cfg, str(cfg.corpus), out, bench)
    cfg.isne.enabled = True
    with _Sampler() as memory:
        t0 = time.perf_counter()
        summary = run_isne_stage(cfg, out)
        wall = time.perf_counter() - t0
    chunks = ingested["chunks"]
    return {
        "documents": ingested["documents"],
        "documents_skipped": ingested["documents_skipped"],
        "chunks": chunks,
        "wall_s": wall,
        "chunks_per_s": chunks / wall if wall > 0 else 0.0,  # graph nodes embedded per second
        "tokens_per_s": 0.0,
        "padding_efficiency": ingested["padding_efficiency"],
        "peak_rss_bytes": memory.peak_rss,  # over the ISNE stage (the ingest's own is ingest_peak_rss_bytes)
        "ingest_peak_rss_bytes": ingested["peak_rss_bytes"],
        "pairs_per_s": summary.get("pairs_per_s") if isinstance(summary, dict) else None,
        "ingest_wall_s": ingested["wall_s"],
        "isne": summary,
    }


def job_feed(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    """The shipped pipeline with a zero-cost stand-in for the model, at `profile.num_workers`
    workers, and HF `tokenizers` `encode_batch` with as many threads (`benchmarks.feed_bench`)."""
    from hades_gpu.benchmarks.feed_bench import job_feed as run_feed

    return run_feed(cfg, bench, job_dir)


def job_graph(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path) -> dict[str, Any]:
    """Ingest (untimed, ISNE off), then the kNN rows (`benchmarks.knn_bench.knn_section`): ANN and
    exact on the corpus's real MiniLM chunks and on SYNTHETIC vectors of `bench.knn_sizes`. The ISNE
    rows of this job are added beside `result["knn"]`."""
    from hades_gpu.benchmarks.knn_bench import SYNTHETIC, extrapolate_exact, knn_section
    from hades_gpu.graph.io import load_chunk_table

    out = job_dir / DATASET_DIR
    ingest_cfg = dataclasses.replace(cfg, isne=dataclasses.replace(cfg.isne, enabled=False))
    ingested = _ingest(ingest_cfg, str(cfg.corpus), out, bench)
    real = load_chunk_table(out).embedding
    with _Sampler() as memory:
        t0 = time.perf_counter()
        rows = knn_section(list(bench.knn_sizes), list(bench.knn_exact_sizes), int(real.shape[1]) if real.size else 384,
                           bench.knn_bench_k, real, cfg.graph.knn_threads, cfg.graph.knn_threshold)
        wall = time.perf_counter() - t0
    rows += extrapolate_exact(rows, sorted({r["n"] for r in rows if r["data"] == SYNTHETIC}),
                              int(real.shape[1]) if real.size else 384, bench.knn_bench_k)
    return {
        "documents": ingested["documents"],
        "documents_skipped": ingested["documents_skipped"],
        "chunks": ingested["chunks"],
        "wall_s": wall,
        "chunks_per_s": ingested["chunks"] / wall if wall > 0 else 0.0,
        "tokens_per_s": 0.0,
        "padding_efficiency": ingested["padding_efficiency"],
        "peak_rss_bytes": memory.peak_rss,
        "ingest_wall_s": ingested["wall_s"],
        "knn": {"rows": rows, "note": f"synthetic rows are labelled {SYNTHETIC!r}"},
        "isne": _isne_graph_rows(cfg, bench, out, job_dir),
    }


def _isne_graph_rows(cfg: PipelineConfig, bench: BenchConfig, out: Path, job_dir: Path) -> dict[str, Any]:
    """ISNE rows of `bench=graph`: planted-partition sizes (benchmarks.isne_bench, a child process
    per size) and the job's own chunk graph (benchmarks.isne_real.score_output)."""
    from hades_gpu.benchmarks import isne_bench, isne_real

    synthetic: dict[str, Any] = {}
    if bench.isne_sizes:
        path = job_dir / "isne_sizes.json"
        isne_bench.main(["--sizes", ",".join(str(n) for n in bench.isne_sizes),
                         "--max-batches", str(bench.isne_max_batches), "--out", str(path)])
        synthetic = json.loads(path.read_text())
    real = isne_real.score_output(cfg, out, Path(str(cfg.corpus)), epochs=bench.isne_real_epochs)
    return {"planted_partition": synthetic, "chunk_graph": real}


JOB_FUNCS: dict[str, Callable[[PipelineConfig, BenchConfig, Path], dict[str, Any]]] = {
    "ingest": job_ingest,
    "embed_only": job_embed_only,
    "triton": job_triton,
    "isne": job_isne,
    "feed": job_feed,
    "graph": job_graph,
}
assert set(JOB_FUNCS) == set(JOBS)


# ------------------------------------------------------------------------------------------------
# running one job
# ------------------------------------------------------------------------------------------------
def _hydra_job_info() -> dict[str, Any]:
    """Overrides, job number and launcher of the current Hydra job ({} outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    num = hc.job.get("num", 0)
    return {"overrides": list(hc.overrides.task), "job_num": int(num) if num is not None else 0,
            "job_name": hc.job.name, "output_dir": hc.runtime.output_dir,
            "launcher": str(hc.launcher.get("_target_", "")), "mode": str(hc.mode)}


def check_bench_config(bench: BenchConfig) -> None:
    """The `bench.*` values' ranges, as `config.validate` checks the pipeline's: a -1 was accepted,
    and `bench.knn_sizes=[0]` failed deep inside FAISS with a traceback."""
    checks = [("warmup_batches", bench.warmup_batches >= 0, ">= 0"),
              ("triton_ready_timeout_s", bench.triton_ready_timeout_s > 0, "> 0"),
              ("knn_bench_k", bench.knn_bench_k >= 1, ">= 1"),
              ("knn_sizes", all(n > bench.knn_bench_k for n in bench.knn_sizes), "each > bench.knn_bench_k"),
              ("knn_exact_sizes", all(n > bench.knn_bench_k for n in bench.knn_exact_sizes), "each > bench.knn_bench_k"),
              ("isne_sizes", all(n >= 100 for n in bench.isne_sizes), "each >= 100 (planted-partition nodes)"),
              ("isne_max_batches", bench.isne_max_batches >= 1, ">= 1"),
              ("isne_real_epochs", bench.isne_real_epochs >= 1, ">= 1")]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"bench.{key} must be {want} (got {getattr(bench, key)!r})")


def split_bench_config(dcfg: DictConfig) -> tuple[PipelineConfig, BenchConfig]:
    """The pipeline part (validated as the main job validates it) and the `bench` part."""
    container = OmegaConf.to_container(dcfg, resolve=True)
    assert isinstance(container, dict)
    bench_part = container.pop("bench", None) or {}
    container.pop("hydra", None)
    try:
        bench_obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), bench_part))
    except Exception as err:  # noqa: BLE001 - OmegaConf's errors, turned into one line
        raise ConfigError(f"bad bench config: {str(err).splitlines()[0]}") from err
    assert isinstance(bench_obj, BenchConfig)
    if bench_obj.job not in JOBS:
        raise ConfigError(f"bench.job must be one of {'|'.join(JOBS)} (got {bench_obj.job!r})")
    check_bench_config(bench_obj)
    try:
        from hydra.core.hydra_config import HydraConfig

        chosen = HydraConfig.get().runtime.choices.get("profile")
    except ValueError:  # not under Hydra (tests compose the config themselves)
        chosen = None
    return name_profile(to_pipeline_config(OmegaConf.create(container)), chosen), bench_obj


def run_job(cfg: PipelineConfig, bench: BenchConfig, job_dir: Path,
            job_info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run `bench.job` on `cfg.corpus`; write and return `job_dir/result.json`.

    A failing job still writes its result (``status: error`` with the message) before re-raising,
    so `hades-report` shows it instead of silently dropping a row.
    """
    if not cfg.corpus:
        raise ConfigError("corpus=<dir-or-file> is required")
    if not Path(cfg.corpus).exists():
        raise ConfigError(f"corpus must be an existing file or folder (got {cfg.corpus!r})")
    info = dict(job_info if job_info is not None else _hydra_job_info())
    check_job_folder(job_dir, str(cfg.corpus))
    job_dir.mkdir(parents=True, exist_ok=True)
    pinned = None
    if "joblib" in info.get("launcher", "").lower():
        if bench.pin_gpu:
            pinned = pin_job_gpu(cfg, int(info.get("job_num", 0)))
    result: dict[str, Any] = {
        "job": bench.job,
        "status": "ok",
        "error": None,
        "profile": cfg.profile.name,
        "max_batch_tokens": cfg.profile.max_batch_tokens,
        "max_batch_size": cfg.profile.max_batch_size,
        "num_workers": cfg.profile.num_workers,
        "embedder_name": cfg.embedder.name,
        "corpus": str(Path(cfg.corpus).resolve()),
        "overrides": info.get("overrides", []),
        "job_num": info.get("job_num", 0),
        "launcher": info.get("launcher", ""),
        "gpu_pinning": pinned,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "gpus_visible": len(visible_gpus())},
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    t0 = time.perf_counter()
    try:
        result.update(JOB_FUNCS[bench.job](cfg, bench, job_dir))
        if not result.get("chunks"):
            result.update(status="error", error=f"no chunk was embedded ({result.get('documents_skipped', 0)} "
                                                f"document(s) skipped; see metrics.json): nothing was measured")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: not a failure of the configuration measured
        result.update(status="interrupted", error="interrupted before the job finished (nothing was measured)")
        raise
    except BaseException as err:
        result.update(status="error", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        result["job_wall_s"] = time.perf_counter() - t0  # setup + warm-up + timed region
        result["config"] = config_to_dict(cfg)
        result["bench"] = dataclasses.asdict(bench)  # the job's own settings, defaults included
        (job_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
        if not bench.keep_dataset and (job_dir / DATASET_DIR).exists():
            metrics = job_dir / DATASET_DIR / "metrics.json"
            if metrics.exists():
                shutil.copy(metrics, job_dir / "metrics.json")
            shutil.rmtree(job_dir / DATASET_DIR, ignore_errors=True)
    log.info("%s: %s", job_dir, headline(cfg, bench, result))
    return result


def headline(cfg: PipelineConfig, bench: BenchConfig, result: dict) -> str:
    """The job's one-line figure. The graph and ISNE jobs time their own stage (the ingest before it
    is untimed): their line said "11.8 chunks/s, 0 tokens/s, padding 0.704", the ingest's padding."""
    head = f"{bench.job} {cfg.profile.name} max_batch_tokens={cfg.profile.max_batch_tokens}: "
    if bench.job in ("isne", "graph"):
        pairs = result.get("pairs_per_s")
        return (head + f"{'ISNE stage' if bench.job == 'isne' else 'kNN rows'} {result.get('wall_s', 0.0):.1f} s over "
                f"{result.get('chunks', 0)} chunks ({result.get('chunks_per_s', 0.0):.1f} chunks/s"
                f"{f', {pairs:,.0f} positive pairs/s' if pairs else ''}), peak RSS "
                f"{result.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")
    return (head + f"{result['chunks_per_s']:.1f} chunks/s, {result['tokens_per_s']:.0f} tokens/s, padding "
            f"{result['padding_efficiency']:.3f}, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB"
            f"{stand_in_note(result)}")


def stand_in_note(result: dict) -> str:
    """"; embedder: ZERO-COST STAND-IN ..." when no model ran (the feed job): the console says so, as
    result.json and the report do."""
    embedder = str(result.get("embedder") or "")
    return f"; embedder: {embedder}" if "STAND-IN" in embedder else ""


def write_failed_result(job_dir: Path, dcfg: DictConfig, err: BaseException) -> None:
    """`result.json` of a job refused before it ran (a bad value): status error, the reason and the
    job's overrides, so `hades-report` shows the cause and the swept values."""
    info = _hydra_job_info()
    bench = dcfg.get("bench") or {}
    profile = dcfg.get("profile") or {}
    result = {"job": bench.get("job", "?"), "status": "error", "error": f"{type(err).__name__}: {err}",
              "profile": profile.get("name", "?"), "max_batch_tokens": profile.get("max_batch_tokens"),
              "overrides": info.get("overrides", []), "job_num": info.get("job_num", 0)}
    if "MULTIRUN" not in str(info.get("mode", "")):
        return  # one job: its one error line is the answer (the file made a folder of a refused run)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    except OSError:  # the refusal itself is what the user sees
        pass


def run_bench_app(prog: str = "hades-bench", guard: Optional[Callable] = None,
                  run: Optional[Callable] = None) -> None:
    """`hades-bench`: the Hydra app over `conf/bench_config.yaml` (the main config + `bench`).

    `guard` wraps the job body and `run` runs the app (`hades_gpu.cli` passes its one-line error
    boundary: `guarded`, `run_hydra_main`); without them a `ConfigError` is one line and exit 2.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    register_bench_configs()  # after register_configs(): adds `bench` to the root schema
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def body(dcfg: DictConfig) -> None:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg, bench = split_bench_config(dcfg)
        except ConfigError as err:  # the job's log stayed empty and the report said "see its log"
            write_failed_result(job_dir, dcfg, err)
            raise
        if cfg.corpus and not os.path.isabs(os.path.expanduser(str(cfg.corpus))):
            # relative to where the command ran: with hydra.job.chdir=true the job runs in its own folder
            cfg.corpus = os.path.join(HydraConfig.get().runtime.cwd, str(cfg.corpus))
        result = run_job(cfg, bench, job_dir)
        print(f"{HydraConfig.get().runtime.output_dir}: {headline(cfg, bench, result)}", flush=True)

    def plain(dcfg: DictConfig) -> None:
        try:
            body(dcfg)
        except ConfigError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(2)

    app = hydra.main(config_path=str(conf_dir()), config_name="bench_config", version_base="1.3")(
        guard(body) if guard else plain)
    if run is not None:
        run(app, prog)
    else:
        sys.argv[0] = prog
        app()
