"""The output's shard map: chosen once, reused by every later run and process, and refused when the
run's sharding differs (which would ingest documents twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hades_gpu.records import DocumentRef
from hades_gpu.store.shard_map import (ShardMapError, check_unsharded, clear_shard_done, ensure_shard_map,
                                       load_shard_map, map_path, plan_fingerprint, read_shard_done, write_shard_done)


def refs_of(names: list[str]) -> list[DocumentRef]:
    return [DocumentRef(path=f"/c/{n}", rel_path=n, size=100 + 7 * i, modality="prose", language="text")
            for i, n in enumerate(names)]


def test_the_first_run_fixes_the_cuts_and_later_runs_keep_them(tmp_path):
    first = ensure_shard_map(tmp_path, 4, refs_of([f"a{i}" for i in range(50)]))
    again = ensure_shard_map(tmp_path, 4, refs_of([f"b{i}" for i in range(500)]))  # another corpus: same map
    assert again == first == load_shard_map(tmp_path)
    assert len(first.cuts) == 3 and first.labels() == ["s0of4", "s1of4", "s2of4", "s3of4"]


def test_another_count_or_an_unsharded_output_is_refused_in_one_line(tmp_path):
    ensure_shard_map(tmp_path / "sharded", 4, refs_of(["x", "y"]))
    with pytest.raises(ShardMapError, match="split into 4 shards, not 8"):
        ensure_shard_map(tmp_path / "sharded", 8, refs_of(["x", "y"]))
    with pytest.raises(ShardMapError, match="is split into 4 shards"):
        check_unsharded(tmp_path / "sharded", "s0")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "manifest-s0.sqlite").write_bytes(b"")
    with pytest.raises(ShardMapError, match="unsharded or differently sharded"):
        ensure_shard_map(plain, 2, refs_of(["x"]))
    check_unsharded(plain, "s0")  # no map: fine


def test_a_damaged_map_is_an_error_not_a_silent_new_split(tmp_path):
    ensure_shard_map(tmp_path, 3, refs_of(["x", "y", "z"]))
    raw = json.loads(map_path(tmp_path).read_text())
    raw["cuts"] = raw["cuts"][:1]
    map_path(tmp_path).write_text(json.dumps(raw))
    with pytest.raises(ShardMapError, match="damaged"):
        ensure_shard_map(tmp_path, 3, refs_of(["x"]))
    map_path(tmp_path).write_text("{not json")
    with pytest.raises(ShardMapError, match="unreadable"):
        load_shard_map(tmp_path)


_RACE = """
import sys
from hades_gpu.records import DocumentRef
from hades_gpu.store.shard_map import ensure_shard_map
n = int(sys.argv[2])
refs = [DocumentRef(path=f"/c/{i}", rel_path=f"p{n}-{i}", size=10 + i * n, modality="prose", language="text")
        for i in range(200)]
print(list(ensure_shard_map(sys.argv[1], 5, refs).cuts))
"""


def test_processes_creating_the_map_at_once_all_use_one_map(tmp_path):
    # each process sees a different corpus, so their own cuts differ: all must end up with the winner's
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(n)], stdout=subprocess.PIPE, text=True)
             for n in range(1, 5)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and outs[0] == str(list(load_shard_map(tmp_path).cuts))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind


def test_completion_records_round_trip_and_clear(tmp_path):
    refs = refs_of(["a", "b"])
    fp = plan_fingerprint(refs)
    assert fp == plan_fingerprint(list(reversed(refs)))
    assert fp != plan_fingerprint(refs_of(["a", "c"]))
    assert read_shard_done(tmp_path, "s0of2") is None
    write_shard_done(tmp_path, "s0of2", {"fingerprint": fp, "chunks_written": 3})
    assert read_shard_done(tmp_path, "s0of2")["fingerprint"] == fp
    clear_shard_done(tmp_path, "s0of2")
    clear_shard_done(tmp_path, "s0of2")  # twice: no error
    assert read_shard_done(tmp_path, "s0of2") is None
    (tmp_path / "shards" / "s1of2.json").write_text("{damaged")
    assert read_shard_done(tmp_path, "s1of2") is None  # unreadable: the shard simply runs again
