#!/usr/bin/env python3
"""Triton against in-process embedding, end to end, in one run. (the code: hades_gpu/benchmarks/triton_bench.py; `--help` for its options)."""

import os  # noqa: F401 - environment defaults below
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.benchmarks.triton_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
