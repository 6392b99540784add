#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Real servers the tests run (each fixture starts its own on a free loopback port): Redis for the session tests,
# Prometheus (and its promtool) for the dashboards and the k8s alert rules; espeak-ng speaks the live-input tests'
# audio.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)  # real speech for the live-input tests
if [ ${#missing[@]} -gt 0 ]; then
  echo "[test] installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian's packages start system services (Prometheus on :9090 scraping itself); the tests start their own.
  for service in prometheus prometheus-node-exporter redis-server; do
    $SUDO systemctl stop "$service" 2>/dev/null || $SUDO service "$service" stop 2>/dev/null || true
  done
fi
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra "$@"
