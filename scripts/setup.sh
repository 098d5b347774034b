#!/usr/bin/env bash
# Create .venv with ds4tp and its test tools. On a machine without a CUDA torch this installs the
# CPU build torch==2.13.0 first (an unpinned `torch` would pull a multi-GB CUDA build); on a GPU
# machine, create the venv with --system-site-packages or install your CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
echo "ds4tp installed in $(pwd)/.venv"
