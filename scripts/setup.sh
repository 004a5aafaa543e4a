#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with pcmoe and its extras.
# torch is pinned to the 2.13.0 CPU wheel on this machine kind (any other torch pulls GBs of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
if ! .venv/bin/python -c 'import pcmoe, fastapi, pytest, matplotlib' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.pcmoe-installed ]; then
  .venv/bin/pip install -q -e ".[server,bench,dev]"
  touch .venv/.pcmoe-installed
fi
# pcmoe's native decode kernels (C, seconds to build); without them pcmoe runs its eager path.
.venv/bin/python -m pcmoe.native build >/dev/null || true
# Fashion-MNIST (Debian package) for the vision model's frame stream, when apt is usable.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install dataset-fashion-mnist; vision stream tests will be skipped" >&2
fi
