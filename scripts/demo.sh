#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the demo Director; arguments go to it, e.g.
#   bash scripts/demo.sh --simulate --workload models
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m app "$@"
