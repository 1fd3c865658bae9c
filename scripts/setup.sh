#!/usr/bin/env bash
# Set up .venv for vortex-vram: torch, then the project with its test and models extras.
# Idempotent: a venv whose torch imports and whose project install matches pyproject.toml is
# left as it is (a second run takes about two seconds). Used by scripts/demo.sh, scripts/test.sh
# and .ci/run.
#
# torch: an installed torch of 2.13 or later is kept (a GPU host's CUDA build above all).
# Otherwise: on a host with an NVIDIA driver (nvidia-smi), torch from PyPI, which is the CUDA
# build; elsewhere the CPU build, 2.13.0: a wheel that pip's own configuration can find
# without an index (a local wheel house, as on CI's machines) first, then PyTorch's CPU index
# with short timeouts, so an unreachable index fails in seconds rather than minutes. When no
# torch can be had, one line says so and the script exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU=torch==2.13.0
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1
fail() { echo "setup: $*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || fail "cannot create $VENV with $PYTHON"
py="$VENV/bin/python"
pip=("$py" -m pip install -q)

has_torch() {
  "$py" - <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 13) else 1)
PY
}

if ! has_torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" 'torch>=2.13' >/dev/null 2>&1 \
      || fail "no CUDA build of torch>=2.13 could be installed from PyPI"
  elif ! "${pip[@]}" --no-index "$TORCH_CPU" >/dev/null 2>&1 \
      && ! "${pip[@]}" --retries 1 --timeout 15 --index-url "$CPU_INDEX" "$TORCH_CPU" \
        >/dev/null 2>&1; then
    fail "no $TORCH_CPU (CPU build) could be installed: no local wheel, and $CPU_INDEX was" \
      "unreachable (set TORCH_CPU_INDEX, or install torch into $VENV first)"
  fi
  has_torch || fail "torch was installed but does not import in $VENV"
fi

# The project, when it is not installed yet or pyproject.toml changed since.
stamp="$VENV/.vortex-setup"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "${pip[@]}" -e '.[test,models]' || fail "the project's packages could not be installed"
  echo "$want" >"$stamp"
fi
