#!/usr/bin/env bash
# The project's GPU check, in one command from the repository root, on the lent GPU machine or any box.
#
#   python scripts/gpu_bundle.py pack        # once, here: .gpu_bundle/ (model + wheels, ~45 MiB, git-ignored)
#   device run: command="bash scripts/gpu_check.sh", carry=[".gpu_bundle"], timeout_s=300
#
# With no install: the bundle's wheels (hydra-core, omegaconf, antlr4) go into a --target folder, the
# fp16-packed model is restored to fp32 and named by HADES_GPU_MODEL_DIR, the source tree is on
# PYTHONPATH. Then scripts/gpu_check.py checks the environment, runs `pytest -m gpu tests`, the
# probes and bench_gpu.py within what is left of HADES_GPU_CHECK_LIMIT_S (285 s) after this set-up,
# and writes $OUT/gpu_check.json (after every step) plus the logs: one run and its machine start fit
# a 15-minute device allowance twice. On a box without a GPU it says so and runs only what a CPU can
# (collection, the CPU smoke of bench_gpu).
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
: >"$OUT/setup.log"
if [ -d "$BUNDLE/wheels" ] && ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
  # one wheel at a time: a wheel this machine cannot take (kitoken is compiled) fails alone, and
  # hydra/omegaconf still install (the env step then names what is missing)
  for wheel in "$BUNDLE"/wheels/*.whl; do
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheel" >>"$OUT/setup.log" 2>&1; then
      extra_path=$SITE
    else
      echo "gpu_check: installing $(basename "$wheel") failed (see $OUT/setup.log)" >&2
    fi
  done
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
# the set-up above (pip, the model, the C build) counts against the limit too: the steps get the rest
# (a --budget-s given to this script comes later and wins)
LIMIT=${HADES_GPU_CHECK_LIMIT_S:-285}
BUDGET=$(( LIMIT - SECONDS ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
exec "$PY" scripts/gpu_check.py --out "$OUT" --budget-s "$BUDGET" "$@"
