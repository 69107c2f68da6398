#!/usr/bin/env bash
# Make .venv if it is missing, install tfpar with its test extras, run pytest.
# Arguments go to pytest (e.g. -m "not slow" for the fast tier).
# TFPAR_VENV / TFPAR_CONSTRAINTS pick another virtualenv and pins (scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "[test]"
echo "==> running pytest"
exec "$VENV/bin/python" -m pytest "$@"
