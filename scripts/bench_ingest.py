#!/usr/bin/env python3
"""End-to-end ingest benchmark against sentence-transformers and the model-only ceiling, in one run
(the code: hades_gpu/benchmarks/ingest_bench.py).

Usage: python scripts/bench_ingest.py [--corpus-mb 5] [--profiles balanced,low_memory,high_throughput]
                                      [--scale-profile low_memory --scale 4] [--out bench_ingest.json]
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.benchmarks.ingest_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
