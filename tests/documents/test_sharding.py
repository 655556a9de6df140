"""The shard rule: every document in exactly one shard, shards balanced by bytes, and a document's
shard fixed by its own path and the recorded cuts (adding files never moves another file)."""

from __future__ import annotations

import random

import pytest

from hades_gpu.documents.sharding import balanced_cuts, cuts_for, select_refs, shard_key, shard_of, split_refs
from hades_gpu.records import UNSHARDED, DocumentRef, ShardSpec


def refs_of(n: int, seed: int = 0, prefix: str = "pkg") -> list[DocumentRef]:
    rng = random.Random(seed)
    # heavy-tailed sizes, like a real corpus (a few huge files among many small ones)
    return [DocumentRef(path=f"/c/{prefix}/m{i}.py", rel_path=f"{prefix}/m{i}.py", size=int(rng.paretovariate(1.2) * 1000),
                        modality="code", language="python") for i in range(n)]


def test_spec_parses_i_of_n_and_plain_names_and_refuses_the_rest():
    assert ShardSpec.parse("3/16") == ShardSpec(3, 16, "s03of16")
    assert ShardSpec.parse(" 0 / 2 ").label == "s0of2"
    assert ShardSpec.parse("0/1") == ShardSpec(0, 1, UNSHARDED)
    assert not ShardSpec.parse("s0").sharded and ShardSpec.parse("1/2").sharded
    assert ShardSpec.parse("nightly").label == "nightly"
    for bad in ("16/16", "-1/4", "1/0", "a/b", "x y", "../up"):
        with pytest.raises(ValueError, match="shard must be"):
            ShardSpec.parse(bad)


def test_every_document_lands_in_exactly_one_shard_and_the_bytes_are_balanced():
    refs = refs_of(4000)
    cuts = cuts_for(refs, 8)
    groups = split_refs(refs, cuts)
    assert sorted(r.rel_path for g in groups for r in g) == sorted(r.rel_path for r in refs)
    sizes = [sum(r.size for r in g) for g in groups]
    biggest_file = max(r.size for r in refs)
    mean = sum(sizes) / len(sizes)
    # each shard within one file's size of an equal share: the cut goes between files
    assert all(abs(s - mean) <= biggest_file + 1 for s in sizes), (sizes, biggest_file)
    assert all(select_refs(refs, cuts, i) == g for i, g in enumerate(groups))


def test_balance_beats_counting_files_on_a_skewed_corpus():
    # 10 huge files and 990 tiny ones: equal file counts would leave some shards nearly empty of bytes
    refs = [DocumentRef(path=f"/c/{i}", rel_path=f"f{i}", size=(10**6 if i < 10 else 100), modality="prose",
                        language="text") for i in range(1000)]
    sizes = [sum(r.size for r in g) for g in split_refs(refs, cuts_for(refs, 4))]
    assert max(sizes) <= 2 * min(sizes), sizes


def test_a_files_shard_depends_only_on_its_path_and_the_cuts():
    refs = refs_of(500)
    cuts = cuts_for(refs, 5)
    before = {r.rel_path: shard_of(r.rel_path, cuts) for r in refs}
    grown = refs + refs_of(300, seed=1, prefix="new")
    after = {r.rel_path: i for i, g in enumerate(split_refs(grown, cuts)) for r in g}
    assert all(after[p] == s for p, s in before.items())
    assert shard_key("a/b.py") == shard_key("a/b.py") != shard_key("a/c.py")


def test_fewer_files_than_shards_still_gives_every_shard_a_range():
    cuts = balanced_cuts([(shard_key("only.txt"), 10)], 6)
    assert len(cuts) == 5 and cuts == sorted(set(cuts))
    assert shard_of("only.txt", cuts) == 0
    assert len(balanced_cuts([], 3)) == 2
    assert balanced_cuts([(1, 5)], 1) == []
