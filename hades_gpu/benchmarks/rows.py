"""The one metrics-to-row function: the comparable numbers of a run of the shipped stages, from the
metrics snapshot the run wrote (`RunMetrics.snapshot()`, metrics.json)."""

from __future__ import annotations

from typing import Any, Optional


def metrics_row(metrics: dict[str, Any], wall_s: Optional[float] = None) -> dict[str, Any]:
    """Throughput, padding, memory and backpressure of one run.

    Args:
        metrics (dict): the run's snapshot.
        wall_s (float, optional): the benchmark's own clock for the run (a subprocess's wall time,
            model loading included); rates are per this wall when given, else per the pipeline's.
    """
    pipeline_wall = float(metrics["wall_s"])
    wall = float(wall_s) if wall_s is not None else pipeline_wall
    queues = metrics.get("queues", {})
    chunks, real = int(metrics["chunks"]), int(metrics["real_tokens"])
    return {
        "documents": metrics["documents"]["done"],
        "documents_skipped": metrics["documents"]["skipped"],
        "chunks": chunks,
        "batches": metrics["batches"],
        "real_tokens": real,
        "padded_tokens": metrics["padded_tokens"],
        "wall_s": wall,
        "pipeline_s": pipeline_wall,
        "chunks_per_s": chunks / wall if wall > 0 else 0.0,
        "tokens_per_s": real / wall if wall > 0 else 0.0,
        "pipeline_chunks_per_s": chunks / pipeline_wall if pipeline_wall > 0 else 0.0,
        "padding_efficiency": metrics["padding_efficiency"],
        "peak_rss_bytes": metrics["memory"]["peak_rss_bytes"],
        "backpressure_waits": sum(int(q.get("put_waits", 0)) for q in queues.values()),
        "backpressure_wait_s": sum(float(q.get("put_wait_s", 0.0)) for q in queues.values()),
        "stages": {name: {"items_per_s": s["items_per_s"], "busy_s": s["busy_s"]}
                   for name, s in metrics.get("stages", {}).items()},
        "embedder": str(metrics.get("embedder", "")),
    }
