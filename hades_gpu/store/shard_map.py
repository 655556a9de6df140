"""An output's shard map and its shards' completion records (`documents.sharding` is the rule).

```
<output>/shards.json                 count, the hash-space cuts, when they were chosen
<output>/shards/<label>.json         a finished shard run: its plan fingerprint and summary
```

The cuts are chosen by the first sharded run (from the corpus it discovered) and never change, so a
document's shard is fixed for the life of the output (see `documents.sharding`): a later run with
more or fewer files, a retried task or a user's own scheduler running ``shard=i/n`` by hand all agree.
Several shard processes may create the map at once from the same corpus: the first rename wins
(`os.link` refuses to replace), the others read and use it.

An output is either sharded (a map, `count` manifests named ``sIofN``) or not (manifest ``s0``):
mixing the two would ingest documents twice, so a run of the other kind gets one clear error.

A completion record is removed when its shard starts and written atomically when it ends, so it
exists only for a shard whose last run finished: the cluster driver skips such a shard when its
planned files are unchanged (same fingerprint), which is what lets a restarted driver go on where the
killed one stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hades_gpu.documents.sharding import UNSHARDED, cuts_for, shard_label
from hades_gpu.records import DocumentRef
from hades_gpu.store.atomic import atomic_write_bytes, fsync_dir, temporary_path

MAP_FILE = "shards.json"
DONE_DIR = "shards"
MAP_VERSION = 1


class ShardMapError(RuntimeError):
    """The output's sharding does not match the run (count differs, or sharded vs unsharded)."""


@dataclass(frozen=True)
class ShardMap:
    count: int
    cuts: tuple[int, ...]

    def labels(self) -> list[str]:
        return [shard_label(i, self.count) for i in range(self.count)]


def map_path(output: Path) -> Path:
    return Path(output) / MAP_FILE


def done_path(output: Path, label: str) -> Path:
    return Path(output) / DONE_DIR / f"{label}.json"


def load_shard_map(output: Path) -> Optional[ShardMap]:
    path = map_path(output)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ShardMapError(f"{path} is unreadable ({err}); it fixes which shard owns each file, so it cannot "
                            f"be rebuilt safely: restore it, or ingest into a new output") from err
    try:
        count, cuts = int(raw["count"]), tuple(int(c) for c in raw["cuts"])
    except (KeyError, TypeError, ValueError) as err:
        raise ShardMapError(f"{path} is damaged ({type(err).__name__}: {err})") from err
    if raw.get("version") != MAP_VERSION or len(cuts) != count - 1 or list(cuts) != sorted(cuts):
        raise ShardMapError(f"{path} is damaged or of another version ({raw.get('version')!r})")
    return ShardMap(count, cuts)


def _manifest_shards(output: Path) -> set[str]:
    names = {p.name[len("manifest-"):-len(".sqlite")] for p in Path(output).glob("manifest-*.sqlite")}
    if (Path(output) / "manifest.json").is_file():
        names.add(UNSHARDED)
    return names


def check_unsharded(output: Path, name: str) -> None:
    """Before an unsharded run (shard name `name`): the output must not be a sharded one."""
    smap = load_shard_map(output)
    if smap is not None:
        raise ShardMapError(f"output {output} is split into {smap.count} shards: run it with cluster=ray|local "
                            f"(cluster.shards={smap.count}) or shard=i/{smap.count}, or use a new output")


def ensure_shard_map(output: Path, count: int, refs: Sequence[DocumentRef]) -> ShardMap:
    """The output's map, created from `refs` when the output has none. Raises `ShardMapError` when
    the output is split another way or holds an unsharded run's data."""
    output = Path(output)
    smap = load_shard_map(output)
    if smap is None:
        labels = {shard_label(i, count) for i in range(count)}
        foreign = sorted(_manifest_shards(output) - labels)
        if foreign:
            raise ShardMapError(f"output {output} holds an unsharded or differently sharded run (manifest "
                                f"{foreign[0]!r}): shard it into a new output")
        smap = ShardMap(count, tuple(cuts_for(refs, count)))
        _create_map(output, smap, sum(r.size for r in refs), len(refs))
        smap = load_shard_map(output) or smap  # another process may have been first: use its map
    _check_count(output, smap, count)
    return smap


def check_shard_count(output: Path, count: int) -> None:
    """Raise `ShardMapError` when the output is split into another number of shards than `count`
    (nothing when it has no map yet): a cluster driver checks before it starts Ray (~6 s)."""
    smap = load_shard_map(Path(output))
    if smap is not None:
        _check_count(output, smap, count)


def _check_count(output: Path, smap: ShardMap, count: int) -> None:
    if smap.count != count:
        raise ShardMapError(f"output {output} is split into {smap.count} shards, not {count}: use "
                            f"cluster.shards={smap.count} / shard=i/{smap.count}, or a new output")


def _create_map(output: Path, smap: ShardMap, total_bytes: int, files: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": MAP_VERSION, "count": smap.count, "cuts": list(smap.cuts),
                       "created_unix": time.time(), "corpus_bytes": total_bytes, "corpus_files": files},
                      indent=1).encode()
    target = map_path(output)
    tmp = temporary_path(target)
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, target)  # never replaces an existing map (unlike rename): the first writer wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    fsync_dir(output)


def plan_fingerprint(refs: Sequence[DocumentRef]) -> str:
    """What a shard was asked to ingest: its files' relative paths, sizes and mtimes."""
    h = hashlib.blake2b(digest_size=16)
    for ref in sorted(refs, key=lambda r: r.rel_path):
        h.update(f"{ref.rel_path}\x00{ref.size}\x00{ref.mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def clear_shard_done(output: Path, label: str) -> None:
    try:
        os.unlink(done_path(output, label))
    except FileNotFoundError:
        pass


def write_shard_done(output: Path, label: str, record: dict[str, Any]) -> None:
    path = done_path(output, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=1, default=str).encode())


def read_shard_done(output: Path, label: str) -> Optional[dict[str, Any]]:
    """The completion record of shard `label`, or None (absent or unreadable: run the shard again)."""
    try:
        raw = json.loads(done_path(output, label).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def unfinished_shards(output: Path) -> tuple[list[str], int]:
    """The labels of a sharded output's shards without a completion record, and the shard count
    (([], 0) for an output that is not sharded or whose map is damaged: that is the next run's error)."""
    try:
        smap = load_shard_map(Path(output))
    except ShardMapError:
        return [], 0
    if smap is None:
        return [], 0
    labels = (shard_label(i, smap.count) for i in range(smap.count))
    return [label for label in labels if read_shard_done(Path(output), label) is None], smap.count


__all__ = ["ShardMap", "ShardMapError", "load_shard_map", "ensure_shard_map", "check_unsharded", "plan_fingerprint",
           "clear_shard_done", "write_shard_done", "read_shard_done", "unfinished_shards", "map_path", "done_path"]
