"""metrics.json: the latest run's figures, plus ingest totals carried over every run into the output.

Each ingest (and each cluster run) replaces `metrics.json` (``metrics-<shard>.json`` for a by-hand
shard) with its own snapshot. That alone would let a resume that found nothing new (0 chunks in half
a second) erase the only record of what embedding this output cost, which ISNE's default time budget
is derived from (`isne.time_budget_vs_embedding`). So every file also carries ``ingest_totals``:
``{"runs", "wall_s", "chunks"}`` summed over every run into the output that wrote chunks, read back
from the file being replaced. A damaged previous file costs the history (one warning line), never
the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from hades_gpu.store.atomic import atomic_write_bytes
from hades_gpu.store.layout import metrics_path

log = logging.getLogger(__name__)

INGEST_TOTALS = "ingest_totals"
SHARD_METRICS_GLOB = "metrics-*.json"


def read_metrics(path: Path) -> Optional[dict[str, Any]]:
    """The metrics file at `path`; None when it is missing, or damaged (one warning line then)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s: %s); its ingest totals start again from this run",
                    path, type(err).__name__, err)
        return None
    if not isinstance(data, dict):
        log.warning("%s is not a JSON object; its ingest totals start again from this run", path)
        return None
    return data


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def ingest_totals(previous: Optional[dict[str, Any]], wall_s: float, chunks: int) -> dict[str, Any]:
    """`previous`'s totals (or its own run, for a file written before totals existed) plus this run
    when it wrote chunks."""
    runs, wall, total = 0, 0.0, 0
    if previous is not None:
        prev = previous.get(INGEST_TOTALS)
        if isinstance(prev, dict):
            r, w, c = _number(prev.get("runs")), _number(prev.get("wall_s")), _number(prev.get("chunks"))
            if r is not None and w is not None and c is not None:
                runs, wall, total = int(r), w, int(c)
        else:
            w, c = _number(previous.get("wall_s")), _number(previous.get("chunks"))
            if w is not None and c:
                runs, wall, total = 1, w, int(c)
    if chunks > 0 and wall_s > 0:
        runs, wall, total = runs + 1, wall + float(wall_s), total + int(chunks)
    return {"runs": runs, "wall_s": wall, "chunks": total}


def write_metrics(path: Path, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Replace the metrics file at `path` with `snapshot` (its run's ``wall_s`` and ``chunks``) plus
    the carried ``ingest_totals`` (atomically); returns what was written. A snapshot that already
    holds ``ingest_totals`` (what an earlier call returned, rewritten with more figures by the same
    run) keeps them: counted once."""
    snapshot = dict(snapshot)
    if not isinstance(snapshot.get(INGEST_TOTALS), dict):
        wall, chunks = _number(snapshot.get("wall_s")) or 0.0, int(_number(snapshot.get("chunks")) or 0)
        snapshot[INGEST_TOTALS] = ingest_totals(read_metrics(path), wall, chunks)
    atomic_write_bytes(path, json.dumps(snapshot, indent=2, default=str).encode())
    return snapshot


def _per_chunk(m: dict[str, Any]) -> tuple[float, int]:
    """(seconds, chunks) of embedding one metrics file records (its totals, or its own run)."""
    totals = ingest_totals(m, 0.0, 0)
    return totals["wall_s"], totals["chunks"]


def ingest_seconds_per_chunk(output: Path) -> Optional[tuple[float, str]]:
    """(seconds per chunk that ingesting into `output` took, the file(s) it came from), or None.

    From `metrics.json`'s totals; for an output of by-hand shards without one, the shards' files
    summed (machine time: shards that ran in parallel each count their own wall time)."""
    output = Path(output)
    m = read_metrics(metrics_path(output))
    if m is not None:
        wall, chunks = _per_chunk(m)
        if chunks:
            return wall / chunks, str(metrics_path(output))
    shard_files = sorted(output.glob(SHARD_METRICS_GLOB))
    wall, chunks = 0.0, 0
    for path in shard_files:
        sm = read_metrics(path)
        if sm is not None:
            w, c = _per_chunk(sm)
            wall, chunks = wall + w, chunks + c
    if chunks:
        return wall / chunks, f"{len(shard_files)} shard metrics file(s) in {output}"
    return None


__all__ = ["INGEST_TOTALS", "ingest_seconds_per_chunk", "ingest_totals", "read_metrics", "write_metrics"]
