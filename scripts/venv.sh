# Sourced by demo.sh and test.sh: make .venv if it is missing and install tfpar
# into it with the extras named in $1 (e.g. "[test]"; empty for none).
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing tfpar$1 into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".$1"
