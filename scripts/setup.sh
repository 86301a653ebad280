#!/usr/bin/env bash
# Create .venv (if missing) and install longcat2 with its dependencies. Options name the extras to add:
# --dev (tests, transformers, ruff, the SDKs) or --clients (the openai and anthropic SDKs the README's
# examples use; `make serve` installs them). When the venv has no torch, install the CPU build
# torch==2.13.0 first: a looser requirement would make pip fetch a multi-GB CUDA build.
# Each step says what it does first: pip runs quietly (-q) and a fresh install takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
extras=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --clients) extras+=(clients) ;;
    *) say "unknown option $arg (expected --dev or --clients)"; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv with $("$PY" --version 2>&1) ..."
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0 (the CPU build, about 200 MB) ..."
  .venv/bin/python -m pip install -q torch==2.13.0
fi
spec="."
if [ ${#extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
say "installing longcat2 and its dependencies (pip install -e '$spec'; a minute on a fresh machine) ..."
.venv/bin/python -m pip install -q -e "$spec"
.venv/bin/python -c "import longcat2, torch; print(f'setup: longcat2 {longcat2.__version__} on torch {torch.__version__}, ready')" >&2
