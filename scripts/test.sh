#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the tests; arguments go to pytest, e.g.
#   bash scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
