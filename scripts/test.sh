#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the tests; arguments go to pytest, e.g.
#   bash scripts/test.sh tests/unit -x
# The suite runs on every core (pytest-xdist; work stealing, as a few tests take minutes
# each): VORTEX_TEST_WORKERS sets how many processes (0: none, in this one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest -n "${VORTEX_TEST_WORKERS:-auto}" --dist worksteal "$@"
