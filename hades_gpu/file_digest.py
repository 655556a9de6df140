"""SHA-256 of large, rarely changing files (the model's weights), remembered across processes.

Every run needs the model's fingerprint (`documents.tokenizer.model_fingerprint`: which model an
output's vectors came from) and the exporter's cache key (`embedding.export.model_key`); both hash
the 90 MB weights file, ~0.08 s each on this box's CPU, before a single worker starts. The digest of
a file whose identity and stat have not changed is read back instead, the way git's index trusts a
file's stat: the key is the resolved path, device, inode, size, mtime and ctime (the last changes on
every write and cannot be set back by ``touch``), so a changed file is always hashed again.

Remembered in this process (a dict) and in ``<cache>/file-digests.json`` (``$XDG_CACHE_HOME/hades-gpu``
or ``~/.cache/hades-gpu``, the folder the exported models live in; ``HADES_GPU_DIGEST_CACHE`` names
another file, ``off`` none). Written atomically (temporary file and rename); a damaged or unwritable
cache is ignored: it only saves time. Hand-written rather than a caching library: ~40 lines, and the
stat key is the part that matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

CACHE_ENV = "HADES_GPU_DIGEST_CACHE"
MIN_CACHED_BYTES = 1 << 20  # smaller files hash in well under a millisecond: not worth an entry
MAX_ENTRIES = 64  # the oldest entries go first (model files replaced over time)

_memo: dict[str, str] = {}


def cache_file() -> Optional[Path]:
    """Where digests are remembered (None: `HADES_GPU_DIGEST_CACHE=off`)."""
    named = os.environ.get(CACHE_ENV, "").strip()
    if named.lower() == "off":
        return None
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "hades-gpu" / "file-digests.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _read(cache: Path) -> dict[str, str]:
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}


def _write(cache: Path, entries: dict[str, str]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".file-digests-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entries, fh)
            os.replace(tmp, cache)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only home, full disk: the next run hashes again


def remembered(kind: str, files: Sequence[Union[str, os.PathLike]], compute: Callable[[], str]) -> str:
    """`compute()` (a digest of `files`' contents), or what it returned before for the same `kind`
    and the same stat keys of every file in `files`."""
    resolved = [Path(f).resolve() for f in files]
    key = kind + "|" + "|".join(_stat_key(p) for p in resolved)
    digest = _memo.get(key)
    if digest is not None:
        return digest
    worth_it = sum(p.stat().st_size for p in resolved) >= MIN_CACHED_BYTES
    cache = cache_file() if worth_it else None
    entries = _read(cache) if cache is not None else {}
    digest = entries.get(key)
    if digest is None:
        digest = compute()
        if kind + "|" + "|".join(_stat_key(p) for p in resolved) != key:
            return digest  # a file changed while it was read: remember nothing
        if cache is not None:
            entries.pop(key, None)
            entries[key] = digest
            _write(cache, dict(list(entries.items())[-MAX_ENTRIES:]))
    _memo[key] = digest
    return digest


def sha256_of(path: Union[str, os.PathLike]) -> str:
    """The file's SHA-256 (64 hex digits), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """`sha256_of(path)`, hashed only when the file's stat key is not remembered."""
    return remembered("sha256", [path], lambda: sha256_of(path))


__all__ = ["CACHE_ENV", "cache_file", "remembered", "sha256_of", "file_sha256"]
