#!/usr/bin/env bash
# Set up (idempotent), write the tiny checkpoint and run one spoken turn end to end: out/reply.wav + out/reply.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
[ -f build/tiny/config.json ] || .venv/bin/omni checkpoint tiny build/tiny
mkdir -p out
.venv/bin/omni generate --model build/tiny --text "Hello! Please tell me a short story." \
  --greedy --max-new-tokens 40 --output out/reply.wav --json out/reply.json
