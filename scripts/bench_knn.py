#!/usr/bin/env python
"""kNN edges at scale: ANN (FAISS) build + query-all time and recall@15 vs exact blocked search (the code: hades_gpu/benchmarks/knn_bench.py; `--help` for its options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hades_gpu.benchmarks.knn_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
