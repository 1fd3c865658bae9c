#!/usr/bin/env bash
# One run on the lent GPU (issues 4 and 13): the GPU tests, the benchmarks and the trace replay
# on CUDA capped to 12 GB, and an OOM post-mortem dump, with the results under $OUT.
#
# Prepare here, once: the wheels the device lacks (fastapi, uvicorn, pydantic... by default,
# plus the extras named) into .whl/, which git ignores:
#   ../shared/device/fetch-wheels.sh httptools tqdm orjson
# Then the device command, carrying the wheels (its 600 s limit; the run ends by itself within
# BUDGET_S, 480 s by default):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
# Dry run on a CPU first (the GPU tests skip, the benchmarks use --simulate, the CUDA-only
# steps say they are skipped; a few minutes):
#   SIMULATE=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_run.sh
#
# No step stops the run: each one's output and exit status go to run.log, the last line lists
# the failed steps, and the script exits 1 if any failed. What comes back (the device returns
# at most 8 files): run.log, stress.png, trace_compare.json (simulated vs CUDA replay) and
# results.tar.gz (every JSON, the trace, both replays and the OOM dump).
set -uo pipefail
OUT=${OUT:-results}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
log="$OUT/run.log"
: >"$log"
work=$(mktemp -d)  # bundled into results.tar.gz at the end
if [ -z "${PY:-}" ]; then
  PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python  # the device has no .venv
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log" || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi

failed=()
note() { echo "$*" | tee -a "$log"; }
skip() { note "=== $1: skipped ($2)"; }
# step NAME SECONDS CMD...: run CMD with at most SECONDS (less when the budget runs short),
# log its output and exit status, remember a failure and go on. A step that must exit with
# another status than 0 says so in front: `expect=1 step ...`.
step() {
  local name=$1 limit=$2 want=${expect:-0}; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 15 ]; then
    skip "$name" "out of time: ${SECONDS}s of ${BUDGET_S}s used"; failed+=("$name"); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  note "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local how="exit $rc in $((SECONDS - t0))s"
  [ "$rc" -eq 124 ] && how+=", timed out"
  [ "$want" -ne 0 ] && how+=" (expected $want)"
  note "=== $name: $how"
  [ "$rc" -eq "$want" ] || failed+=("$name")
}

cuda=0
if [ -z "${SIMULATE:-}" ] &&
    "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  cuda=1
fi
sim=(); [ "$cuda" = 1 ] || sim=(--simulate)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "CUDA steps: $([ "$cuda" = 1 ] && echo yes || echo "no (SIMULATE or no GPU)")" \
    "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-}"; } 2>&1 | tee -a "$log"

# Rough costs on an H100, from the CPU timings and the CUDA read costs (not yet measured
# there); each step also pays ~5 s to import torch.
# What the tests and tools import; the device image lacks the web stack without .whl.
step imports 30 "$PY" -c 'import fastapi, uvicorn, pydantic_settings, dotenv, orjson, tqdm, matplotlib, pytest, app.api'
# ~1 min: the backend and the card's seven cases under the 12 GB cap.
step pytest-gpu 150 "$PY" -m pytest --gpu -q -p no:cacheprovider \
  tests/gpu tests/integration/test_cuda_card_cases.py
# ~30 s: 100,000 calls per guard, and torch.cuda.memory_allocated() (~100 µs) beside them.
step guard-latency 90 "$PY" benchmarks/guard_latency.py "${sim[@]}" \
  --json "$work/guard_latency.json"
# ~20 s: what each source of the allocator model costs (stats, mem_get_info, the snapshot)
# in a fragmented state: the CUDA figures README's "where the cache is read" still lacks.
step cache-sources 90 "$PY" benchmarks/cache_sources.py "${sim[@]}" \
  --json "$OUT/cache_sources.json"

# Trace replay, ~30 s: 1,000 slots (~8,800 steps) recorded on the simulated card in ~2 s,
# replayed at ~10 µs a step on each card.
trace=(benchmarks/trace_replay.py)
step trace-record 60 "$PY" "${trace[@]}" record --iterations 1000 --out "$work/trace.json"
step trace-replay-sim 60 "$PY" "${trace[@]}" replay --simulate "$work/trace.json" \
  --out "$work/replay_sim.json"
if [ "$cuda" = 1 ]; then
  step trace-replay-cuda 90 "$PY" "${trace[@]}" replay "$work/trace.json" \
    --out "$work/replay_cuda.json"
  other="$work/replay_cuda.json"
else
  skip trace-replay-cuda "no CUDA; comparing a second simulated replay instead"
  step trace-replay-sim-again 60 "$PY" "${trace[@]}" replay --simulate "$work/trace.json" \
    --out "$work/replay_sim_again.json"
  other="$work/replay_sim_again.json"
fi
step trace-compare 30 "$PY" "${trace[@]}" compare "$work/replay_sim.json" "$other" \
  --json "$OUT/trace_compare.json"

# The real models' trace, ~15 s a card: five slots of the five real architectures (518,000
# steps), recorded on the simulated card and committed, since the device lacks the `models`
# extra (regenerate: trace_replay.py record --workload models --iterations 5 --out <it>).
real=benchmarks/traces/real-models.json.gz
step real-replay-sim 90 "$PY" "${trace[@]}" replay --simulate "$real" \
  --out "$work/real_replay_sim.json"
if [ "$cuda" = 1 ]; then
  step real-replay-cuda 120 "$PY" "${trace[@]}" replay "$real" --out "$work/real_replay_cuda.json"
  step real-compare 30 "$PY" "${trace[@]}" compare "$work/real_replay_sim.json" \
    "$work/real_replay_cuda.json" --json "$work/real_trace_compare.json"
else
  skip real-replay-cuda "no CUDA"
fi

# ~15 s: an OOM inside generation() must leave a memory_viz dump that loads.
cat >"$work/postmortem.py" <<'EOF'
import pickle
import sys
from pathlib import Path

import torch

from app.backends import CudaBackend
from app.errors import MemoryPressureError
from app.monitor import VRAMMonitor
from benchmarks.card import CARD_BYTES

history = Path(sys.argv[1])
total = torch.cuda.get_device_properties(0).total_memory
backend = CudaBackend(0, memory_fraction=min(1.0, CARD_BYTES / total), memory_history=True,
                      history_dir=history)
monitor = VRAMMonitor(backend=backend)
try:
    with monitor.generation(1), monitor.stage("flux"):
        torch.empty(int(CARD_BYTES) + 2**30, dtype=torch.uint8, device="cuda")
except MemoryPressureError as exc:
    print(f"caught ({exc.reason}): {str(exc).splitlines()[0]}")
else:
    sys.exit("no OOM: the 12 GB cap did not hold")
dumps = sorted(history.glob("oom-*.pickle"))
if not dumps:
    sys.exit(f"no dump in {history}")
with dumps[-1].open("rb") as f:
    snap = pickle.load(f)
missing = {"segments", "device_traces"} - set(snap)
actions = sorted({e.get("action") for t in snap.get("device_traces", []) for e in t})
print(f"{dumps[-1].name}: {dumps[-1].stat().st_size:,} bytes, keys {sorted(snap)}, "
      f"{len(snap.get('segments', []))} segments, trace actions {actions}")
sys.exit(f"missing keys {sorted(missing)}" if missing else 0)
EOF
if [ "$cuda" = 1 ]; then
  step oom-postmortem 60 "$PY" "$work/postmortem.py" "$work/postmortem"
else
  skip oom-postmortem "needs CUDA"
fi

# ~1-2 min on CUDA (real fp16 stand-in models; 1,000 slots of five stages).
step stress 150 "$PY" benchmarks/vram_stress_test.py "${sim[@]}" --iterations 1000 \
  --plot "$OUT/stress.png" --json "$work/stress.json"
# ~20 s.
step profile 60 "$PY" benchmarks/vram_profile.py "${sim[@]}" --json "$work/profile.json"
# ~1 min each; with a leak injected the detector must exit 1.
step leak-none 90 "$PY" benchmarks/memory_leak_detector.py "${sim[@]}" --generations 500 \
  --json "$work/leak_none.json"
expect=1 step leak-injected 90 "$PY" benchmarks/memory_leak_detector.py "${sim[@]}" \
  --generations 300 --inject-leak-mb 2 --json "$work/leak_injected.json"

tar -czf "$OUT/results.tar.gz" -C "$work" . 2>&1 | tee -a "$log"
rm -rf "$work"
if [ "${#failed[@]}" -eq 0 ]; then
  note "summary: all steps passed in ${SECONDS}s"
  exit 0
fi
note "summary: ${#failed[@]} failed or not run in ${SECONDS}s: ${failed[*]}"
exit 1
