"""`cluster=ray` on a real multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head
with no CPUs and two worker nodes of one CPU each, every listener on 127.0.0.1).

What must hold (issue 14): 2- and 4-shard runs write exactly the chunks (ids, texts, offsets,
embeddings) of a single-box run of the same corpus; a worker node killed mid-run (`remove_node(...,
allow_graceful=False)`) still leaves every chunk exactly once; a driver killed with SIGKILL and
started again resumes without running the shards that had finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from corpus_helpers import SAMPLE_CORPUS, copy_files, stdlib_sources
from requirements import require_module

from hades_gpu.config import load_pipeline_config
from hades_gpu.store.lock import read_holder
from hades_gpu.store.reader import read_chunks, read_isne_embeddings

ray = require_module("ray", "the [cluster] extra (Ray) is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from hades_gpu.cluster import ClusterIngest, ClusterRunError  # noqa: E402

COLUMNS = ["chunk_id", "doc_id", "text", "char_start", "char_end", "embedding"]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # FACTS.md: loopback only
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
WAIT_S = 300


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR")}
    # a short folder: Ray's session paths hold Unix sockets (at most 107 bytes)
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ.update(RAY_ENV, RAY_TMPDIR=tmp)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20,
                                                      "include_dashboard": False})
    c.add_node(**NODE)
    c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster_corpus")
    copy_files(stdlib_sources(16), base / "corpus" / "code")
    copy_files(sorted(p for p in SAMPLE_CORPUS.rglob("*") if p.is_file()), base / "corpus" / "prose")
    return base / "corpus"


# fp32: a shard packs different batches than the single-box run, and bf16 kernels round differently per
# batch shape (cosine 0.999994 measured here); in fp32 the same chunk gives the same vector in any batch.
PRECISION = "embedder.precision=fp32"


def overrides(address: str, shards: int, isne: bool = False) -> list[str]:
    return ["monitoring.progress=off", PRECISION, f"isne.enabled={str(isne).lower()}", "isne.epochs=2", "profile.num_workers=1",
            "profile.writer_rows_per_part=64", "cluster=ray", f"cluster.address={address}", f"cluster.shards={shards}",
            "cluster.num_cpus_per_shard=1", "cluster.poll_s=0.2", "cluster.lock_wait_s=60", "cluster.task_timeout_s=600"]


@pytest.fixture(scope="module")
def single_box(tmp_path_factory, corpus):
    """The same corpus ingested by one process, the reference every cluster run must reproduce."""
    from hades_gpu.pipelines import TextParallelPipeline

    out = tmp_path_factory.mktemp("single") / "out"
    cfg = load_pipeline_config("balanced", ["monitoring.progress=off", "isne.enabled=false", "profile.num_workers=1",
                                            PRECISION])
    TextParallelPipeline(cfg).process_batch([corpus], output=out)
    return by_chunk(out)


def by_chunk(out: Path) -> dict[str, dict]:
    rows = read_chunks(out, COLUMNS).to_pylist()
    ids = [r["chunk_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} chunk(s) written twice"
    return {r["chunk_id"]: r for r in rows}


def assert_same_chunks(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys(), f"{len(want.keys() - got.keys())} missing, {len(got.keys() - want.keys())} extra"
    worst = 1.0
    for cid, a in got.items():
        b = want[cid]
        assert (a["doc_id"], a["text"], a["char_start"], a["char_end"]) == (b["doc_id"], b["text"], b["char_start"],
                                                                            b["char_end"])
        x, y = np.asarray(a["embedding"]), np.asarray(b["embedding"])
        worst = min(worst, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    assert round(worst, 5) == 1.0, worst


def test_two_and_four_shard_runs_write_the_single_box_chunks(cluster, corpus, single_box, tmp_path):
    for shards in (2, 4):
        out = tmp_path / f"out{shards}"
        cfg = load_pipeline_config("balanced", overrides(cluster.address, shards, isne=shards == 2))
        result = ClusterIngest(cfg).run([corpus], out)
        assert_same_chunks(by_chunk(out), single_box)
        meta = result.metrics
        assert meta["cluster"]["shards"] == shards and meta["cluster"]["retries"] == 0
        assert result.chunks_written == len(single_box)
        assert len({s["node"] for s in meta["shards"]}) == 2  # both worker nodes took shards
        assert sorted(p.name for p in (out / "shards").glob("*.json")) == [f"s{i}of{shards}.json" for i in range(shards)]
        written = json.loads((out / "metrics.json").read_text())
        assert written["cluster"]["shards"] == shards
        # what embedded, as a single-box metrics.json says; the ingest totals ISNE's budget reads
        assert isinstance(written["embedder"], str) and written["embedder"]
        assert written["ingest_totals"] == {"runs": 1, "wall_s": written["wall_s"], "chunks": len(single_box)}
        if shards == 2:  # the graph and ISNE stage ran once, over both shards
            ids, vecs = read_isne_embeddings(out)
            assert sorted(ids) == sorted(single_box) and len(list((out / "isne").glob("embeddings-*"))) == 1
            assert result.isne["mode"] == "trained" and result.isne["n_nodes"] == len(single_box)


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _shard_running_on(out: Path, raylet: int) -> bool:
    """Some shard's lock is held by a Ray worker of the node whose raylet is `raylet`."""
    for lock in out.glob(".lock-s*of*"):
        holder = read_holder(lock) or {}
        pid = int(holder.get("pid") or -1)
        if pid > 0 and _parent_pid(pid) == raylet:
            return True
    return False


def test_a_worker_node_killed_mid_run_still_leaves_every_chunk_once(cluster, corpus, single_box, tmp_path):
    out = tmp_path / "out"
    cfg = load_pipeline_config("balanced", overrides(cluster.address, 4))
    victim = cluster.list_all_nodes()[-1]
    raylet = _raylet_pid(victim)
    box: dict = {}
    driver = threading.Thread(target=lambda: box.setdefault("result", ClusterIngest(cfg).run([corpus], out)), daemon=True)
    driver.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not _shard_running_on(out, raylet):
            assert driver.is_alive() and time.monotonic() < deadline, "no shard ever ran on the second node"
            time.sleep(0.05)
        cluster.remove_node(victim, allow_graceful=False)
        driver.join(WAIT_S)
        assert not driver.is_alive(), "the driver did not finish after the node was removed"
    finally:
        cluster.add_node(**NODE)  # the next test wants two worker nodes again
        cluster.wait_for_nodes()
    result = box["result"]
    assert result.metrics["cluster"]["retries"] >= 1
    assert any(s["attempts"] > 1 and s["errors"] for s in result.metrics["shards"])
    assert_same_chunks(by_chunk(out), single_box)
    assert result.documents_ingested == len({r["doc_id"] for r in single_box.values()})


def test_a_killed_driver_started_again_skips_the_shards_that_finished(cluster, corpus, single_box, tmp_path):
    out = tmp_path / "out"
    shards = 6
    command = [str(Path(sys.executable).with_name("hades-ingest")), f"corpus={corpus}", f"output={out}",
               *overrides(cluster.address, shards)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not list((out / "shards").glob("*.json")):
            assert first.poll() is None, f"the driver ended early: {first.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard finished"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    finished = {p.name: p.read_text() for p in (out / "shards").glob("*.json")}
    assert 0 < len(finished) < shards, "kill the driver while shards remain"

    second = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S)
    assert second.returncode == 0, second.stderr[-3000:]
    for name, record in finished.items():  # not run again: the same completion record, byte for byte
        assert (out / "shards" / name).read_text() == record
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cluster"]["shards_done_earlier"] == len(finished)
    assert {s["shard"] + ".json" for s in metrics["shards"] if s["done_earlier"]} == set(finished)
    assert_same_chunks(by_chunk(out), single_box)


def test_an_unreachable_cluster_is_one_line_and_exit_1(corpus, tmp_path):
    cfg = ["monitoring.progress=off", "cluster=ray", "cluster.address=127.0.0.1:9", "cluster.connect_timeout_s=5"]
    run = subprocess.run([str(Path(sys.executable).with_name("hades-ingest")), f"corpus={corpus}",
                          f"output={tmp_path / 'out'}", *cfg], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "could not connect to the Ray cluster at '127.0.0.1:9'" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_shard_shape_no_node_fits_is_capped_or_refused_never_queued_forever(cluster, tmp_path):
    """The profile's default (num_workers + 1 CPUs) larger than any node takes a whole node; an explicit
    shape no node offers is one error at once (Ray itself would leave such a task pending forever)."""
    base = [o for o in overrides(cluster.address, 2) if not o.startswith(("cluster.num_cpus", "profile.num_workers"))]
    cfg = load_pipeline_config("balanced", [*base, "profile.num_workers=2"])
    result = ClusterIngest(cfg).run([SAMPLE_CORPUS], tmp_path / "capped")
    assert result.metrics["cluster"]["num_cpus_per_shard"] == 1.0 and result.chunks_written > 0
    cfg = load_pipeline_config("balanced", [*base, "cluster.num_cpus_per_shard=4"])
    with pytest.raises(ClusterRunError, match=r"no node of the cluster offers 4 CPU\(s\) and 0 GPU\(s\)"):
        ClusterIngest(cfg).run([SAMPLE_CORPUS], tmp_path / "refused")
    # the graph and ISNE task's shape too, before any shard runs (it waited task_timeout_s x attempts)
    cfg = load_pipeline_config("balanced", [*overrides(cluster.address, 2, isne=True), "cluster.stage_num_cpus=4"])
    with pytest.raises(ClusterRunError, match=r"offers 4 CPU\(s\) and 0 GPU\(s\) for the graph and ISNE stage"):
        ClusterIngest(cfg).run([SAMPLE_CORPUS], tmp_path / "stage")
    assert not list((tmp_path / "stage").glob("chunks/*.parquet"))


def test_a_cluster_run_of_only_bad_files_builds_no_graph(cluster, tmp_path):
    """A corpus of only binary files: the run said "nothing ingested" (exit 1, as on one box), but the
    graph and ISNE stage had run first and written edges and ISNE vectors of nothing."""
    from hades_gpu.pipelines.ingest import NothingIngestedError

    corpus = tmp_path / "bin"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"b{i}.dat").write_bytes(bytes(range(256)) * 8)
    cfg = load_pipeline_config("balanced", overrides(cluster.address, 2, isne=True))
    with pytest.raises(NothingIngestedError):
        ClusterIngest(cfg).run([corpus], tmp_path / "out")
    assert not (tmp_path / "out" / "edges.parquet").exists() and not (tmp_path / "out" / "isne").exists()


def test_remove_missing_runs_a_finished_shard_that_a_plain_rerun_left_holding_deleted_files(cluster, tmp_path):
    """A plain re-run after files were deleted records each shard as finished with the new plan; a
    later `remove_missing=true` run skipped those shards ("finished ... not run again") and the
    deleted files' chunks stayed. A shard is now skipped under remove_missing only if its last run
    removed missing files too."""
    corpus = copy_files(stdlib_sources(6, max_bytes=6_000), tmp_path / "corpus")
    out = tmp_path / "out"

    def run(*extra: str):
        cfg = load_pipeline_config("balanced", [*overrides(cluster.address, 2), *extra])
        return ClusterIngest(cfg).run([corpus], out)

    run()
    gone = sorted(corpus.iterdir())[:2]
    for path in gone:
        path.unlink()
    run()  # plain: the deleted files' chunks stay, as documented
    assert {str(p) for p in gone} <= set(read_chunks(out, ["path"]).column("path").to_pylist())
    result = run("documents.remove_missing=true")
    assert result.documents_removed == 2
    paths = set(read_chunks(out, ["path"]).column("path").to_pylist())
    assert paths == {str(p) for p in corpus.iterdir()}
    again = run("documents.remove_missing=true")  # now every shard is done with nothing missing: skipped
    assert again.metrics["cluster"]["shards_done_earlier"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _driver_env() -> dict[str, str]:
    """The user's environment: none of the module's Ray settings (the driver must set its own)."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV and k != "RAY_TMPDIR"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.mark.parametrize("auth", ["disabled", "token"])
def test_a_head_started_on_loopback_by_hand_is_reached_by_its_address(tmp_path, auth):
    """`ray start --head --node-ip-address=127.0.0.1` then `cluster.address=127.0.0.1:<port>`: the
    driver registered the host's other address and dialled the head there for ever (10 minutes of
    "Failed to connect to GCS at 192.0.2.2"). A loopback address now keeps the driver on loopback.

    With a Ray token on the box and RAY_AUTH_MODE unset, `ray start` turns token authentication on,
    and the driver (auth off) failed after 20 lines of InvalidAuthToken; and a head named only by
    RAY_ADDRESS (cluster.address=auto) was dialled at the host's other address past every timeout."""
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    user_env = _driver_env()
    if auth == "token":  # the user's token, where Ray looks for one (not their ~/.ray: the test's own)
        import secrets

        token = tmp_path / "auth_token"
        token.write_text(secrets.token_hex(32))
        user_env = {k: v for k, v in user_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        user_env["RAY_AUTH_TOKEN_PATH"] = str(token)
    # as the user's head, on loopback; "disabled": token authentication off (its token would sit in --temp-dir)
    head_env = {**user_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp}
    if auth == "disabled":
        head_env["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                             "--num-cpus=2", f"--temp-dir={ray_tmp}"],
                            env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        corpus = copy_files(stdlib_sources(3, max_bytes=6_000), tmp_path / "corpus")
        out = tmp_path / "out"
        address, driver_env = f"127.0.0.1:{port}", user_env
        if auth == "token":  # named by RAY_ADDRESS only
            address, driver_env = "auto", {**user_env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        driver = subprocess.run(
            [str(Path(sys.executable).with_name("hades-ingest")), f"corpus={corpus}", f"output={out}",
             *overrides(address, 2), "cluster.connect_timeout_s=60"],
            env=driver_env, capture_output=True, text=True, timeout=240)
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert len(by_chunk(out)) > 0
    finally:
        head.terminate()  # --block: the head stops what it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        head.stderr.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sigterm_to_a_cluster_local_driver_is_the_one_line_and_exit_143(tmp_path):
    """Ray's core worker replaced the command line's SIGTERM handler with a native one: a stack
    dump and exit 1 instead of `terminated by SIGTERM (...)` and 143."""
    import psutil

    corpus = copy_files(stdlib_sources(12), tmp_path / "corpus")
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rayl", dir="/tmp")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("hades-ingest")), f"corpus={corpus}", f"output={out}",
         "monitoring.progress=off", "isne.enabled=false", "profile.num_workers=1", "cluster=local",
         "cluster.shards=3", "cluster.num_cpus_per_shard=1"],
        env={**_driver_env(), "RAY_TMPDIR": ray_tmp}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not list(out.glob(".lock-s*of*")):  # a shard task holds its lock: Ray is up and running
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no shard started"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "SIGTERM" in ln]
        assert lines == ["hades-ingest: error: terminated by SIGTERM (committed parts are kept: re-run to resume)"], \
            stderr[-3000:]
        psutil.wait_procs(children, timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
