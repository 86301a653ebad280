#!/usr/bin/env bash
# Create .venv (if missing) and install longcat2 with its dependencies. With --dev, the test extras too.
# When the venv has no torch, install the CPU build torch==2.13.0 first: a looser requirement would make
# pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q -e ".${extra}"
.venv/bin/python -c "import longcat2, torch; print(f'longcat2 {longcat2.__version__} on torch {torch.__version__}')"
