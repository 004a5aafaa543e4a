#!/usr/bin/env bash
# Set up (idempotent), lint, then run the test suite (slow tests excluded unless PCMOE_SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
marker=(-m "not slow")
[ "${PCMOE_SLOW:-0}" = 1 ] && marker=()
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} exec .venv/bin/pytest -q "${marker[@]}" "$@"
