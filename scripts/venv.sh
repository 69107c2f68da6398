# Sourced by demo.sh and test.sh: make the virtualenv if it is missing and
# install tfpar into it (editable) with the extras named in $1 (e.g. "[test]";
# empty for none). Sets VENV to its directory.
#   TFPAR_VENV         the virtualenv (default .venv); CI also uses one with the oldest pair
#   TFPAR_CONSTRAINTS  a pip constraints file, e.g. .ci/oldest.txt (TensorFlow 2.20, Keras 3.10)
# TensorFlow comes from the [cpu] extra unless the virtualenv already has one
# (tensorflow-tpu on a TPU VM, tensorflow[and-cuda], a build of your own),
# which is then kept.
PYTHON=${PYTHON:-python3}
VENV=${TFPAR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
_extras=${1#[}
_extras=${_extras%]}
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"; then
  _extras="cpu${_extras:+,$_extras}"
fi
_constraints=()
if [ -n "${TFPAR_CONSTRAINTS:-}" ]; then _constraints=(-c "$TFPAR_CONSTRAINTS"); fi
echo "==> installing tfpar${_extras:+[$_extras]} into $VENV${TFPAR_CONSTRAINTS:+ (constraints: $TFPAR_CONSTRAINTS)}"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet ${_constraints[@]+"${_constraints[@]}"} -e ".${_extras:+[$_extras]}"
