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
        # What the output held when the run began is all a lookup can find: a document is looked up
        # before this run writes its rows. So an output that held nothing answers without a query
        # (two SQLite lookups per document were ~8% of the router's CPU on a fresh output), and a
        # document whose stat changed keeps the hash `by_stat` found for the task that follows.
        self._empty = manifest.document_count() == 0
        self._found: dict[str, str] = {}

    def by_stat(self, ref: DocumentRef) -> Resume:
        if self._empty:
            return Resume.READ
        entry = self.manifest.lookup(ref.rel_path)
        if entry is None:
            return Resume.READ
        if entry.same_stat(ref.size, ref.mtime_ns, ref.stat_tag or None):  # 0: a ref made without a stat
            return Resume.UNCHANGED
        self._found[ref.rel_path] = entry.content_hash
        return Resume.READ

    def known_hash(self, ref: DocumentRef) -> Optional[str]:
        """The content hash the output holds for this document (None: not in it). Sent to the worker
        with the task, which then reports an equal hash as unchanged instead of packing it."""
        if self._empty:
            return None
        found = self._found.pop(ref.rel_path, None)
        if found is not None:
            return found
        known = self.manifest.lookup(ref.rel_path)
        return known.content_hash if known is not None else None

    def by_content(self, doc: ChunkedDocument) -> Resume:
        known = self.known_hash(doc.ref)
        if known is None:
            return Resume.NEW
        return Resume.UNCHANGED if known == doc.content_hash else Resume.CHANGED
