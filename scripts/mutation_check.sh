#!/usr/bin/env bash
# Mutation testing of the core modules (mutmut 3), each against its fast tests; not part of CI.
#   scripts/mutation_check.sh [store|orchestration|chunking|isne|graph ...]
# Writes docs/mutation/report.md and docs/mutation/results.json (see scripts/mutation_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import mutmut" 2>/dev/null || "$PY" -m pip install -q "mutmut>=3.8,<4"
exec "$PY" scripts/mutation_check.py "$@"
