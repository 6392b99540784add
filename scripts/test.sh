#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra "$@"
