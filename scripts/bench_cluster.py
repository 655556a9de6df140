#!/usr/bin/env python3
"""The scale-out benchmark: `hades-ingest cluster=local` (Ray, one task per shard) against the
single-box run of the same corpus, in one run (the code: hades_gpu/benchmarks/cluster_bench.py).

Usage: python scripts/bench_cluster.py [--corpus-mb 12.5] [--shards 2] [--profile balanced]
                                       [--out docs/bench_cluster.json]
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.benchmarks.cluster_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
