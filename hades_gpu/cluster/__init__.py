"""Scale-out: one corpus ingested as shards on Ray (`cluster=ray|local`), exactly once.

Optional (the ``[cluster]`` extra): nothing below this package imports it, and the single-box path
never imports Ray. `driver.ClusterIngest` is the entry point; `runtime` connects to Ray; `tasks`
holds what runs on the nodes.
"""

from hades_gpu.cluster.driver import ClusterIngest, ClusterRunError

__all__ = ["ClusterIngest", "ClusterRunError"]
