#!/usr/bin/env bash
# Make .venv if it is missing, install tfpar with its test extras, run pytest.
# Arguments go to pytest (e.g. -m "not slow" for the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "[test]"
echo "==> running pytest"
exec .venv/bin/python -m pytest "$@"
