#!/usr/bin/env python
"""GPU embedding benchmark: one run, a table and a JSON file (the code: hades_gpu/benchmarks/gpu_bench.py).

    python scripts/bench_gpu.py --chunks 20000 --json bench_gpu.json
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers and tokenizers are imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from hades_gpu.benchmarks.gpu_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
