#!/usr/bin/env bash
# Proves the TPU VM install: beside tensorflow-tpu 2.20.0, `pip install tfpar[tpu]`
# resolves without a second TensorFlow. Makes a scratch virtualenv (deleted at the
# end), installs tensorflow-tpu==2.20.0 into it (about 0.5 GB from PyPI), then asks
# pip for a dry-run report of installing this checkout with the [tpu] extra and
# fails if the report would install any TensorFlow distribution.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install --quiet --upgrade pip
echo "==> pip install tensorflow-tpu==2.20.0 (scratch venv)"
$pip install --quiet "tensorflow-tpu==2.20.0"
echo "==> pip install --dry-run --report report.json '.[tpu]'"
$pip install --quiet --dry-run --report "$work/report.json" ".[tpu]"
"$work/venv/bin/python" - "$work/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
names = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"])
print("would install:", ", ".join(names))
tensorflows = [n for n in names if n.split("==")[0].lower().replace("_", "-") in
               ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tensorflow-intel", "tf-nightly")]
if tensorflows:
    sys.exit(f"FAIL: installing tfpar[tpu] beside tensorflow-tpu 2.20.0 would add {', '.join(tensorflows)}")
print("OK: no second TensorFlow; tensorflow-tpu 2.20.0 is kept")
PY
