"""Which shard a document belongs to: a stable rule on its relative path, balanced by size.

A corpus split into `n` shards is a partition of the 64-bit hash space of `rel_path` into `n`
ranges. The cut points are chosen once, from the corpus as first seen, so that every range holds
about the same number of bytes; afterwards a document's shard depends only on its own path and the
recorded cuts (`store.shard_map` keeps them in the output). So adding or removing files never
moves any other file to a different shard, and a shard that already committed a document keeps it:
nothing is ingested by two shards, however often the corpus changes between runs.

Why a hash and not the sorted path: neighbouring paths (one package, one folder of huge logs)
would all land in one shard; the hash spreads them, the cuts balance the bytes.

`records.ShardSpec` parses the user's ``shard=3/16`` (or a name like ``s0``, an unsharded run).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterable, Optional, Sequence

from hades_gpu.documents.document_list import DocumentList
from hades_gpu.records import UNSHARDED, DocumentRef, ShardSpec, shard_label

def shard_key(rel_path: str) -> int:
    """The document's place in the hash space: the first 8 bytes of blake2b of its relative path."""
    digest = hashlib.blake2b(rel_path.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def balanced_cuts(sized_keys: Iterable[tuple[int, int]], count: int) -> list[int]:
    """`count - 1` increasing cut points in hash space such that the ranges
    ``[0, c1), [c1, c2), ... [c_last, 2**64)`` hold about equal bytes.

    `sized_keys` are ``(shard_key, size)`` pairs. Each file counts at least 1 byte, so a corpus of
    empty files still spreads. With fewer files than shards the upper shards stay empty; cuts are
    then spaced evenly above the last key so every shard still has a range.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count})")
    items = sorted((k, max(1, int(s))) for k, s in sized_keys)
    total = sum(s for _, s in items)
    cuts: list[int] = []
    acc = 0
    target = 1
    for key, size in items:
        # a file belongs to the range its first byte falls in: cut before it once the running total
        # of the files before it reaches the next share
        while target < count and acc >= total * target / count:
            if not cuts or key > cuts[-1]:
                cuts.append(key)
            target += 1
        acc += size
    top = 1 << 64
    last = cuts[-1] if cuts else (items[-1][0] if items else 0)
    while len(cuts) < count - 1:  # not enough files to fill every shard: even ranges above the last key
        remaining = count - 1 - len(cuts)
        step = max(1, (top - 1 - last) // (remaining + 1))
        last = min(top - 1, last + step)
        if cuts and last <= cuts[-1]:
            last = cuts[-1] + 1
        cuts.append(last)
    return cuts


def shard_of(rel_path: str, cuts: Sequence[int]) -> int:
    """The shard index of `rel_path` under `cuts` (`balanced_cuts`)."""
    return bisect.bisect_right(cuts, shard_key(rel_path))


def split_refs(refs: Sequence[DocumentRef], cuts: Sequence[int]) -> list[DocumentList]:
    """`refs` grouped per shard (len(cuts) + 1 lists), each keeping discovery's order."""
    groups = [DocumentList() for _ in range(len(cuts) + 1)]
    for ref in refs:
        groups[shard_of(ref.rel_path, cuts)].append(ref)
    return groups


def select_refs(refs: Sequence[DocumentRef], cuts: Sequence[int], index: int) -> DocumentList:
    """The refs of shard `index` (discovery's order)."""
    return DocumentList(r for r in refs if shard_of(r.rel_path, cuts) == index)


def cuts_for(refs: Sequence[DocumentRef], count: int) -> list[int]:
    return balanced_cuts(((shard_key(r.rel_path), r.size) for r in refs), count)


def shard_bytes(groups: Sequence[Sequence[DocumentRef]]) -> list[int]:
    return [sum(r.size for r in g) for g in groups]


def parse_shard(text: Optional[str]) -> ShardSpec:
    return ShardSpec.parse(UNSHARDED if text is None else text)


__all__ = ["ShardSpec", "UNSHARDED", "shard_key", "shard_label", "balanced_cuts", "shard_of", "split_refs",
           "select_refs", "cuts_for", "shard_bytes", "parse_shard"]
