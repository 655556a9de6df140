"""Claims of the documents a run is about to ingest, so two unsharded runs at once never both write one.

A by-hand shard name (``shard=<name>``, and the default ``s0``) writes its own manifest, and a run
skips the documents another name has *committed* (`manifest.claimed_by_other_shards`). Two such runs
started together saw nothing committed by the other and both ingested everything: every chunk twice,
and search returned each hit twice. Each run now records the documents it is about to ingest (those
no manifest holds yet) in ``claims.sqlite``, in one IMMEDIATE transaction that first reads the other
names' claims: a claim by a shard whose run is alive now (its output lock held) wins, and the
document is skipped here; a claim left by a run that has ended is taken over. A run drops its own
claims when it ends (its manifest then says what it holds).

Why SQLite: one transaction across processes is the whole protocol, as for the manifests.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from pathlib import Path
from typing import Iterable

from hades_gpu.store.manifest import LOOKUP_BATCH, damaged

log = logging.getLogger(__name__)

CLAIMS_FILE = "claims.sqlite"


def claims_path(output: Path) -> Path:
    return Path(output) / CLAIMS_FILE


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=120.0, isolation_level=None)  # transactions opened by hand
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS claims (rel_path TEXT PRIMARY KEY, shard TEXT NOT NULL) WITHOUT ROWID")
    except BaseException:
        conn.close()
        raise
    return conn


class ClaimsDamagedError(RuntimeError):
    """claims.sqlite is no SQLite database any more while another run of the output is going."""


def _open_undamaged(output: Path, running: set[str]) -> sqlite3.Connection:
    """The claims database, made anew when damaged and no other run of the output is going."""
    path = claims_path(output)
    if path.exists() and not path.is_file():
        raise ClaimsDamagedError(f"{path} is not a file: remove it (it holds only the document claims of runs in "
                                 "progress, made anew by the next run)")
    try:
        conn = _connect(path)
    except sqlite3.DatabaseError as err:
        if not damaged(err):
            raise
        if running:
            raise ClaimsDamagedError(
                f"{path} is damaged ({err}); it holds only the document claims of runs in progress: delete it once "
                f"no run is writing to {output} (shards running now: {', '.join(sorted(running))}), then re-run"
            ) from None
        log.warning("%s is damaged (%s); no other run of this output is going, so it is made anew", path, err)
        for leftover in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal")):
            leftover.unlink(missing_ok=True)
        conn = _connect(path)
    return conn


def claim_documents(output: Path, shard: str, rel_paths: Iterable[str], running: set[str]) -> dict[str, str]:
    """Claim `rel_paths` for `shard`. Returns rel_path -> the shard in `running` (a run in progress,
    not this one) that claimed it first: those are not claimed, and this run must skip them.

    A damaged claims.sqlite (it holds only the claims of runs in progress) is made anew when no
    other run of the output is going, with a warning; while one is, `ClaimsDamagedError` says what
    to do. It failed every later run with new documents as "manifest database error", the manifest
    intact."""
    keys = iter(rel_paths)  # in batches: a run of millions of documents holds no list of their names here
    batch = list(itertools.islice(keys, LOOKUP_BATCH))
    if not batch:
        return {}
    taken: dict[str, str] = {}
    conn = _open_undamaged(output, running)
    try:
        conn.execute("BEGIN IMMEDIATE")  # one writer at a time: read the others' claims, then add ours
        try:
            while batch:
                marks = ",".join("?" * len(batch))
                for rel, other in conn.execute(f"SELECT rel_path, shard FROM claims WHERE rel_path IN ({marks}) "
                                               "AND shard != ?", (*batch, shard)):
                    if other in running:
                        taken[rel] = other
                conn.executemany("INSERT OR REPLACE INTO claims (rel_path, shard) VALUES (?, ?)",
                                 ((rel, shard) for rel in batch if rel not in taken))
                batch = list(itertools.islice(keys, LOOKUP_BATCH))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return taken


def release_claims(output: Path, shard: str) -> None:
    """Drop `shard`'s claims (its run has ended: what it committed, its manifest holds)."""
    path = claims_path(output)
    if not path.is_file():
        return
    try:
        conn = _connect(path)
    except sqlite3.DatabaseError as err:
        if not damaged(err):
            raise
        # this run's claims cannot be in it; the next run that claims makes it anew (or names it while
        # another run goes). Each run with nothing new warned about it, again and again.
        log.debug("%s is damaged (%s): no claims of this run to drop", path, err)
        return
    try:
        conn.execute("DELETE FROM claims WHERE shard = ?", (shard,))
    finally:
        conn.close()
