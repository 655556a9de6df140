#!/usr/bin/env bash
# Create (or reuse) .venv and install hades-gpu from this checkout.
# torch is installed first, pinned by constraints.txt, so a CPU box keeps the CPU build and never
# pulls a multi-GB CUDA build through a dependency's open range (FACTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.hades-gpu-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
   || [ hades_gpu/documents/_wordpiece.c -nt "$stamp" ] || [ hades_gpu/documents/_python_lines.c -nt "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  .venv/bin/pip install -q -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q -c constraints.txt -e ".[serve,test,cluster]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import hades_gpu, torch, openvino, tritonclient.grpc, ray" \
    || { echo "bootstrap: install failed" >&2; exit 1; }
  touch "$stamp"
fi
# the C parts of the chunker are optional (setup.py): say so when they could not be built
.venv/bin/python -c "import hades_gpu.documents._wordpiece, hades_gpu.documents._python_lines" 2>/dev/null \
  || echo "bootstrap: the C extensions were not built (no C compiler?): the chunker uses its Python paths" >&2
# Byte-compile the package, as installing a wheel would: this checkout is installed editable, and where
# PYTHONDONTWRITEBYTECODE is set (this box's shells) every process — each worker of every run — would
# otherwise compile the package's sources again at import (~50 ms per worker process, measured).
# Stale .pyc files are harmless: Python recompiles a source newer than its cache in memory.
.venv/bin/python -m compileall -q -j 0 hades_gpu >/dev/null
