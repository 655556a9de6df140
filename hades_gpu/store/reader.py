"""Read an ingest output: list its committed part files (any shard) and load them as Arrow tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def committed_parts(output: Path) -> list[str]:
    """Names of parts committed by every shard's manifest (interrupted parts are excluded)."""
    output = Path(output)
    parts: list[str] = []
    for manifest in sorted(output.glob("manifest*.json")):
        parts.extend(json.loads(manifest.read_text()).get("parts", []))
    return sorted(parts)


def _read(output: Path, folder: str, columns: Optional[Sequence[str]]) -> pa.Table:
    output = Path(output)
    paths = [output / folder / f"{part}.parquet" for part in committed_parts(output)]
    paths = [p for p in paths if p.exists()]
    if not paths:
        raise FileNotFoundError(f"no committed {folder} part files under {output} (run hades-ingest first)")
    return pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in paths])


def read_chunks(output: Path, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All chunk rows (`doc_id, chunk_id, path, ..., embedding`) of an ingest output."""
    return _read(output, "chunks", columns)


def read_documents(output: Path, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All document rows (`doc_id, rel_path, ..., references`) of an ingest output."""
    return _read(output, "documents", columns)


def is_ingest_output(path: Path) -> bool:
    return any(Path(path).glob("manifest*.json"))
