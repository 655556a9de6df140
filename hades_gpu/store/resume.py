"""Resume: the one place that decides, per discovered document, whether an output already holds it.

Two checks, cheapest first:

1. **by stat** (before reading): size and mtime as recorded in the manifest -> ``UNCHANGED``, the
   file is not even read;
2. **by content** (after the worker read and hashed it): same content hash -> ``UNCHANGED`` (its
   committed rows are kept and its new size and mtime recorded, so the next run stops at check 1);
   a different hash -> ``CHANGED`` (re-embedded; the writer replaces its old rows); not in the
   manifest -> ``NEW``.
"""

from __future__ import annotations

import enum
from typing import Optional

from hades_gpu.records import ChunkedDocument, DocumentRef
from hades_gpu.store.manifest import Manifest


class Resume(str, enum.Enum):
    UNCHANGED = "unchanged"
    CHANGED = "changed"
    NEW = "new"
    READ = "read"  # check 1 could not decide: read the file and ask `by_content`


class ResumePolicy:
    """Answers the two checks against one shard's manifest; `note_unchanged` hands the writer the new
    stat of a document found identical by content."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def by_stat(self, ref: DocumentRef) -> Resume:
        return Resume.UNCHANGED if self.manifest.is_unchanged(ref.rel_path, ref.size, ref.mtime_ns) else Resume.READ

    def known_hash(self, ref: DocumentRef) -> Optional[str]:
        """The content hash the output holds for this document (None: not in it). Sent to the worker
        with the task, which then reports an equal hash as unchanged instead of packing it."""
        known = self.manifest.lookup(ref.rel_path)
        return known.content_hash if known is not None else None

    def by_content(self, doc: ChunkedDocument) -> Resume:
        known = self.known_hash(doc.ref)
        if known is None:
            return Resume.NEW
        return Resume.UNCHANGED if known == doc.content_hash else Resume.CHANGED
