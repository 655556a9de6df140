"""The manifest: which part files are committed and which documents they hold.

A part file exists on disk before the manifest names it, so after a crash the manifest is the truth:
parts it does not name are interrupted writes and are removed, and their documents are ingested
again. Every write is atomic (temporary file, fsync, rename), so a SIGKILL leaves either the old or
the new manifest, never a torn one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def manifest_path(output: Path, shard: str) -> Path:
    """`manifest.json` for the default shard, `manifest-<shard>.json` for the others."""
    return output / ("manifest.json" if shard == "s0" else f"manifest-{shard}.json")


@dataclass
class DocumentEntry:
    doc_id: str
    content_hash: str
    n_chunks: int
    part: str
    size: int = 0
    mtime_ns: int = 0


@dataclass
class Manifest:
    """Committed parts and finished documents of one shard."""

    shard: str
    parts: list[str] = field(default_factory=list)
    documents: dict[str, DocumentEntry] = field(default_factory=dict)  # rel_path -> entry

    @classmethod
    def load(cls, output: Path, shard: str) -> "Manifest":
        path = manifest_path(output, shard)
        if not path.exists():
            return cls(shard=shard)
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"manifest {path} is unreadable: {err}") from err
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest {path} has version {raw.get('version')!r}, expected {MANIFEST_VERSION}")
        docs = {rel: DocumentEntry(**entry) for rel, entry in raw.get("documents", {}).items()}
        return cls(shard=raw.get("shard", shard), parts=list(raw.get("parts", [])), documents=docs)

    def save(self, output: Path) -> None:
        payload = {
            "version": MANIFEST_VERSION,
            "shard": self.shard,
            "parts": self.parts,
            "documents": {rel: vars(entry) for rel, entry in self.documents.items()},
        }
        atomic_write_bytes(manifest_path(output, self.shard), json.dumps(payload, separators=(",", ":")).encode())

    def is_unchanged(self, rel_path: str, size: int, mtime_ns: int) -> bool:
        """True when the document is done and its size and mtime are as recorded (no re-read needed)."""
        entry = self.documents.get(rel_path)
        return entry is not None and entry.size == size and entry.mtime_ns == mtime_ns

    def next_part_number(self) -> int:
        numbers = [int(p.rsplit("-", 1)[-1]) for p in self.parts]
        return max(numbers, default=0) + 1
