#!/usr/bin/env bash
# Regenerate services/wire/gen/ from protos/ with grpcio-tools; commit the result (tests/test_wire.py fails when
# the committed code is stale).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-.venv/bin/python}" -m services.wire.codegen
