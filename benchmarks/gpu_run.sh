#!/usr/bin/env bash
# One run on the lent GPU (issue 4): the GPU tests and the four benchmarks on CUDA, with the
# results under $OUT (at most 8 files come back). Prepare here, once:
#   ../shared/device/fetch-wheels.sh httptools    # fastapi, uvicorn, pydantic... into .whl/
# then run it with the device tool, carrying .whl:
#   bash benchmarks/gpu_run.sh
# Try it on a CPU first with SIMULATE=1 (the tests skip, the benchmarks use --simulate).
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PY:-python3}
sim=(); [ -n "${SIMULATE:-}" ] && sim=(--simulate)
log="$OUT/run.log"
step() { echo "=== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
  | tee -a "$log"
step "$PY" -m pytest --gpu -q -p no:cacheprovider \
  tests/gpu tests/integration/test_cuda_card_cases.py
step "$PY" benchmarks/guard_latency.py "${sim[@]}" --json "$OUT/guard_latency.json"
step "$PY" benchmarks/vram_stress_test.py "${sim[@]}" --iterations 1000 \
  --plot "$OUT/stress.png" --json "$OUT/stress.json"
step "$PY" benchmarks/vram_profile.py "${sim[@]}" --json "$OUT/profile.json"
step "$PY" benchmarks/memory_leak_detector.py "${sim[@]}" --generations 500 \
  --json "$OUT/leak_none.json"
step "$PY" benchmarks/memory_leak_detector.py "${sim[@]}" --generations 300 \
  --inject-leak-mb 2 --json "$OUT/leak_injected.json"
echo "done" | tee -a "$log"
