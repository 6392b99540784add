#!/usr/bin/env bash
# Copy deploy/gpu.yaml into k8s/rayservice.yaml's serveConfigV2; commit the result (tests/test_k8s.py fails when
# the committed manifest is stale).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-.venv/bin/python}" -m services.serving.k8s
