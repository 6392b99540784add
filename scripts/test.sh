#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# The session tests run a real Redis server (the fixture starts its own on a free port).
if ! command -v redis-server >/dev/null; then
  echo "[test] installing redis-server"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra "$@"
