#!/usr/bin/env python
"""ISNE quality on planted-partition graphs, with the protocol of Kiss & Szűcs (2024). (the code: hades_gpu/benchmarks/isne_eval.py; `--help` for its options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hades_gpu.benchmarks.isne_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
