"""What runs on the cluster's nodes: one shard's ingest, and the graph + ISNE stage once at the end.

Plain functions, wrapped with `ray.remote` by the driver (so importing this module needs no Ray).
Each returns a small dict; the chunks themselves go to the shared output folder, never through Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hades_gpu.config import PipelineConfig
from hades_gpu.documents.discovery import Skip
from hades_gpu.pipelines.ingest import IngestPipeline, IngestResult, NothingIngestedError
from hades_gpu.records import DocumentRef
from hades_gpu.store.lock import OutputLockedError

log = logging.getLogger(__name__)


def summarize(result: IngestResult, label: str, nothing_ingested: bool = False) -> dict[str, Any]:
    metrics = result.metrics or {}
    return {
        "shard": label, "documents_total": result.documents_total, "documents_ingested": result.documents_ingested,
        "documents_unchanged": result.documents_unchanged, "documents_removed": result.documents_removed,
        "chunks_written": result.chunks_written,
        "skipped": list(result.skipped), "wall_s": float(metrics.get("wall_s", 0.0) or 0.0),
        "nothing_ingested": nothing_ingested, "host": socket.gethostname(), "pid": os.getpid(),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "node": _node_id(),
        "embedder": metrics.get("embedder"),  # None when the shard had nothing to embed
    }


def _node_id() -> str:
    """The Ray node this task runs on ("" outside Ray), for the driver's per-shard report."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - a report field only
        return ""


def ingest_shard(cfg: PipelineConfig, refs: Sequence[DocumentRef], skips: Sequence[Skip], output: str,
                 corpus_found: bool = False) -> dict[str, Any]:
    """Ingest one shard (``cfg.shard = "i/n"``) of documents the driver discovered; resumes from the
    shard's manifest like any run. A previous attempt of the same shard that is still dying holds
    the shard's lock: wait up to `cluster.lock_wait_s` for it rather than fail at once.
    `corpus_found`: the driver's discovery found documents (this shard's share may be none)."""
    pipeline = IngestPipeline(cfg)
    deadline = time.monotonic() + cfg.cluster.lock_wait_s
    while True:
        try:
            result = pipeline.ingest_planned(refs, skips, Path(output), corpus_found)
            return summarize(result, pipeline.shard.label)
        except NothingIngestedError as err:  # a shard of only bad files: an outcome, not a failure
            return summarize(err.result, pipeline.shard.label, nothing_ingested=True)
        except OutputLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def run_graph_stage(cfg: PipelineConfig, output: str, driver: Optional[tuple[str, int]] = None) -> dict[str, Any]:
    """The graph and ISNE stage over every shard's committed chunks (`isne.stage`), for the cluster
    driver `driver` (host, pid), whose output lock it does not wait for."""
    from hades_gpu.isne.stage import run_isne_stage

    metrics = run_isne_stage(cfg, Path(output), driver=driver)
    metrics["host"] = socket.gethostname()
    metrics["gpu"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return metrics


__all__ = ["ingest_shard", "run_graph_stage", "summarize"]
