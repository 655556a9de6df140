"""Schema of the `bench` config group (`conf/bench/*.yaml`) and of `hades-bench`'s primary config.

`hades-bench` composes `conf/bench_config.yaml`: the main job's `config` plus `bench: <job>`. The
main job's schema (`pipeline_schema`, a closed dataclass) has no `bench` key, so inside the bench app
`pipeline_schema` names `BenchAppConfig`, which is `PipelineConfig` plus `bench`. A misspelt key is
still an error everywhere, `conf/config.yaml` stays the one source of the pipeline's defaults, and
`hades-ingest` (which registers the plain schema) is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hades_gpu.config import PipelineConfig

JOBS = ("ingest", "embed_only", "triton", "isne", "feed", "graph")


@dataclass
class BenchConfig:
    """One benchmark job on `corpus=`; its `result.json` lands in the Hydra job's output folder."""

    job: str = "ingest"  # ingest | embed_only | triton | isne | feed | graph
    warmup_batches: int = 1  # model batches run before the timed region (loads kernels, caches)
    keep_dataset: bool = False  # keep the dataset the job wrote (job_dir/dataset); else delete it
    # triton: the server to use; null = start one (hades_gpu.embedding.triton_server) for the job
    triton_url: Optional[str] = None
    triton_ready_timeout_s: float = 300.0
    # pin the job to GPU (hydra.job.num mod visible GPUs) when several are visible
    pin_gpu: bool = True
    # graph: SYNTHETIC vector counts for the kNN rows (ANN build + query-all, recall@knn_bench_k), and
    # the counts where exact blocked search is timed too (others: extrapolated as N^2, labelled)
    knn_sizes: list[int] = field(default_factory=lambda: [100_000])
    knn_exact_sizes: list[int] = field(default_factory=lambda: [20_000])
    knn_bench_k: int = 15
    # graph: ISNE on planted-partition graphs of these node counts (scripts/bench_isne.py, one child
    # process each, `isne_max_batches` timed batches per epoch, the rest extrapolated), and on the
    # corpus's own chunk graph for `isne_real_epochs` epochs, with and without edge weights
    isne_sizes: list[int] = field(default_factory=lambda: [10_000, 100_000])
    isne_max_batches: int = 20
    isne_real_epochs: int = 5


@dataclass
class BenchAppConfig(PipelineConfig):
    """`hades-bench`'s root: the whole pipeline config plus the `bench` group."""

    bench: BenchConfig = field(default_factory=BenchConfig)


def register_bench_configs() -> None:
    """Register the bench group's schema (`bench/bench_schema`) and the bench app's root schema.

    Call it after `hades_gpu.config.register_configs()`, in the bench app only: it re-points
    `pipeline_schema` at `BenchAppConfig` (`register_configs()` points it back).
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="bench", name="bench_schema", node=BenchConfig)
    cs.store(name="pipeline_schema", node=BenchAppConfig)
