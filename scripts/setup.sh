#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch first (from this machine's local wheels where
# present), then this project and its test extras. Usage: source scripts/setup.sh  (or bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@"; }
# torch and torchvision go first and pinned: the Qwen3-Omni processor needs torchvision, and an unpinned torch
# would pull a multi-GB download (see DEVELOPERS.md).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
  pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "[setup] installing omni-serve and its dependencies"
pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import services, transformers, torch; print('[setup] ok: torch', torch.__version__, 'transformers', transformers.__version__)"
