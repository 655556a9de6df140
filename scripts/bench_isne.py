#!/usr/bin/env python
"""ISNE training throughput and peak memory at growing graph sizes. (the code: hades_gpu/benchmarks/isne_bench.py; `--help` for its options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hades_gpu.benchmarks.isne_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
