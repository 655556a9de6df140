"""The cluster group and the optional extra: `cluster=ray|local` composes and validates like every
group, the single-box path never imports Ray, and a cluster run without Ray installed is one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from corpus_helpers import SAMPLE_CORPUS

from hades_gpu.config import ConfigError, load_pipeline_config


def test_the_cluster_group_composes_and_validates():
    assert load_pipeline_config().cluster.mode == "none"
    cfg = load_pipeline_config("balanced", ["cluster=ray", "cluster.address=10.0.0.1:6379", "cluster.shards=16"])
    assert (cfg.cluster.mode, cfg.cluster.address, cfg.cluster.shards) == ("ray", "10.0.0.1:6379", 16)
    assert load_pipeline_config("balanced", ["cluster=local"]).cluster.object_store_bytes == 256 * 2**20
    with pytest.raises(ConfigError, match="cluster.mode must be one of"):
        load_pipeline_config("balanced", ["cluster.mode=slurm"])
    with pytest.raises(ConfigError, match=r"shard must be unset \(s0\) with cluster=ray\|local"):
        load_pipeline_config("balanced", ["cluster=ray", "shard=3/16"])
    with pytest.raises(ConfigError, match="cluster.task_timeout_s must be > 0"):
        load_pipeline_config("balanced", ["cluster=ray", "cluster.task_timeout_s=0"])
    for bad in ("16/16", "0/0", "s03of16", "-1/4", "a b"):
        with pytest.raises(ConfigError):
            load_pipeline_config("balanced", [f"shard={bad}"])
    assert load_pipeline_config("balanced", ["shard=3/16"]).shard == "3/16"


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_single_box_path_never_imports_ray(tmp_path):
    proc = _python(f"""
        import sys
        from hades_gpu.config import load_pipeline_config
        from hades_gpu.pipelines import TextParallelPipeline
        from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
        cfg = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off"])
        res = TextParallelPipeline(cfg, embedder=ZeroCostEmbedder()).process_batch([{str(SAMPLE_CORPUS)!r}],
                                                                                   output={str(tmp_path / "out")!r})
        print("RESULT", res.chunks_written, "ray" in sys.modules)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0].split()
    assert int(line[1]) > 0 and line[2] == "False"


def test_a_cluster_run_without_ray_installed_is_one_config_line_and_exit_2(tmp_path):
    # sys.modules["ray"] = None is exactly "not installed" to `import ray` (the extra is absent)
    proc = _python(f"""
        import sys
        sys.modules["ray"] = None
        sys.argv = ["hades-ingest", "corpus={SAMPLE_CORPUS}", "output={tmp_path / 'out'}", "cluster=ray",
                    "monitoring.progress=off"]
        from hades_gpu.cli import ingest_main
        ingest_main()
    """, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster=ray|local needs Ray: pip install 'hades-gpu[cluster]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_source_turns_remove_missing_off_for_every_shard(tmp_path):
    """Only shard 0 receives discovery's skips: the driver decides for all shards that a missing source
    means nothing is removed (a typo must not empty the other shards' documents). No Ray needed."""
    from hades_gpu.cluster.driver import ClusterIngest, ShardRun
    from hades_gpu.documents.document_list import DocumentList
    from hades_gpu.documents.discovery import discover

    cfg = load_pipeline_config("balanced", ["cluster=local", "documents.remove_missing=true"])
    driver = ClusterIngest(cfg)
    _refs, skips = discover([str(SAMPLE_CORPUS), str(tmp_path / "typo")], cfg.documents)
    assert "missing" in [s.reason for s in skips]
    driver._source_missing = any(s.reason == "missing" for s in skips)
    shard = driver._shard_config(ShardRun(1, "01-of-02", DocumentList(), [], ""), 2)
    assert shard.shard == "1/2" and shard.documents.remove_missing is False
    driver._source_missing = False
    assert driver._shard_config(ShardRun(1, "01-of-02", DocumentList(), [], ""), 2).documents.remove_missing is True


def test_another_shard_count_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """`cluster.shards=2` on an output split into 4: refused only after a Ray instance had started
    (~6 s here, and the shape warnings printed). Now before any Ray call."""
    import hades_gpu.cluster.driver as driver_module
    from hades_gpu.cluster.driver import ClusterIngest
    from hades_gpu.documents.discovery import discover
    from hades_gpu.store.shard_map import ShardMapError, ensure_shard_map

    cfg = load_pipeline_config("balanced", ["cluster=local", "cluster.shards=2"])
    refs, _ = discover([str(SAMPLE_CORPUS)], cfg.documents)
    ensure_shard_map(tmp_path / "out", 4, refs)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the shard count was checked")

    monkeypatch.setattr(driver_module, "ray_session", no_ray)
    with pytest.raises(ShardMapError, match="split into 4 shards, not 2"):
        ClusterIngest(cfg).run([SAMPLE_CORPUS], tmp_path / "out")
