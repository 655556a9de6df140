#!/usr/bin/env python
"""Speed and accuracy of the local embedder per precision (fp32, default, int8), on local text. (the code: hades_gpu/benchmarks/precision.py; `--help` for its options)."""

import os  # noqa: F401 - environment defaults below
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.benchmarks.precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
