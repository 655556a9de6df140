#!/usr/bin/env python3
"""The feed benchmark: the shipped pipeline with a ZERO-COST STAND-IN for the model, 1..N workers,
against HF `tokenizers` encode_batch with the same threads, in one run (the code:
hades_gpu/benchmarks/feed_bench.py).

Usage: python scripts/bench_feed.py [--corpus-mb 12] [--workers 1..N] [--profile balanced]
                                    [--out docs/bench_feed.json]
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.benchmarks.feed_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
