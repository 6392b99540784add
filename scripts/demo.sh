#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent), write the tiny checkpoint, start every stage as a
# Ray Serve application on a local Ray cluster (`omni serve`), speak one turn through the gRPC API (`omni chat`)
# into out/reply.wav + out/reply.json, then stop the cluster.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
PORT=${OMNI_PORT:-9000}
[ -f build/tiny/config.json ] || .venv/bin/omni checkpoint tiny build/tiny
mkdir -p out
echo "[demo] starting omni serve (a local Ray cluster and 8 applications; about a minute on 2 cores)"
.venv/bin/omni serve --model build/tiny --port "$PORT" > out/serve.log 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT  # background jobs ignore SIGINT
for _ in $(seq 1 600); do
  grep -q "omni serve: ready" out/serve.log && break
  kill -0 $SERVE 2>/dev/null || { cat out/serve.log; echo "[demo] omni serve failed"; exit 1; }
  sleep 1
done
grep "omni serve:" out/serve.log
.venv/bin/omni chat --address "127.0.0.1:$PORT" --text "Hello! Please tell me a short story." \
  --greedy --max-new-tokens 40 --max-audio-frames 120 --output out/reply.wav --json out/reply.json
