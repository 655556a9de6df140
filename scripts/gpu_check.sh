#!/usr/bin/env bash
# The project's GPU check, in one command from the repository root, on the lent GPU machine or any box.
#
#   python scripts/gpu_bundle.py pack        # once, here: .gpu_bundle/ (model + wheels, ~45 MiB, git-ignored)
#   device run: command="bash scripts/gpu_check.sh", carry=[".gpu_bundle"], timeout_s=540
#
# With no install: the bundle's wheels (hydra-core, omegaconf, antlr4) go into a --target folder, the
# fp16-packed model is restored to fp32 and named by HADES_GPU_MODEL_DIR, the source tree is on
# PYTHONPATH. Then scripts/gpu_check.py checks the environment, runs `pytest -m gpu tests`, the
# probes and bench_gpu.py within 8 minutes, and writes $OUT/gpu_check.json plus the logs. On a box
# without a GPU it says so and runs only what a CPU can (collection, the CPU smoke of bench_gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
BUNDLE=${HADES_GPU_BUNDLE:-$ROOT/.gpu_bundle}
PY=${PYTHON:-python3}
SITE=${HADES_GPU_SITE:-/tmp/hades-gpu-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ORT_DISABLE_TELEMETRY=1

extra_path=""
if [ -d "$BUNDLE/wheels" ] && ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$BUNDLE"/wheels/*.whl >"$OUT/setup.log" 2>&1; then
    extra_path=$SITE
  else
    echo "gpu_check: installing the bundle's wheels failed (see $OUT/setup.log)" >&2
  fi
fi
if [ -z "${HADES_GPU_MODEL_DIR:-}" ] && [ -d "$BUNDLE/model" ]; then
  if restored=$("$PY" scripts/gpu_bundle.py restore "$BUNDLE/model" /tmp/hades-gpu-model 2>>"$OUT/setup.log"); then
    export HADES_GPU_MODEL_DIR=$restored
  else
    echo "gpu_check: restoring the bundle's model failed (see $OUT/setup.log)" >&2
  fi
fi
# the optional C parts of the chunker (setup.py) for this machine's Python, built in place; without
# them the chunker takes its Python paths (kitoken/HF, NumPy), so a failure is one line
if ! "$PY" -c "import hades_gpu.documents._wordpiece, hades_gpu.documents._python_lines" >/dev/null 2>&1; then
  "$PY" setup.py -q build_ext --inplace >>"$OUT/setup.log" 2>&1 \
    || echo "gpu_check: the C extensions could not be built here (see $OUT/setup.log): Python paths" >&2
fi
export PYTHONPATH=$ROOT${extra_path:+:$extra_path}${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" scripts/gpu_check.py --out "$OUT" "$@"
