"""The TensorFlow and Keras versions tfpar supports, checked before anything else runs.

tfpar wraps Keras internals (``tfpar.core.internals``), so it names the range it
is tested on (CI runs both ends) and refuses to start outside it, with one
sentence naming what is installed and what is supported. The check reads
package metadata only: it imports neither TensorFlow nor Keras, so it is
instant and works when they are missing or broken.

TensorFlow comes in several distributions (``tensorflow``, ``tensorflow-cpu``,
``tensorflow-tpu``, ...) that all install the same ``tensorflow`` package, so
tfpar itself does not depend on one; its extras pick one
(``tfpar[cpu]``, ``tfpar[and-cuda]``, ``tfpar[tpu]``) and a TPU VM keeps its
``tensorflow-tpu``. Two of them installed at once overwrite each other's
files, which is refused too.

``TFPAR_SKIP_VERSION_CHECK=1`` skips the check (e.g. for a TensorFlow built
from source that has no package metadata, or to try a newer release).
"""

import importlib.metadata
import importlib.util
import os
import re
import sys

# (oldest, newest) major.minor, both ends tested in CI (.ci/run); setup.py reads these.
__version__ = "0.1.0"  # tfpar's own; ``tfpar.__version__``
TENSORFLOW = ("2.20", "2.21")
KERAS = ("3.10", "3.15")
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tensorflow-intel",
                            "tensorflow-macos", "tf-nightly", "tf-nightly-cpu", "tf-nightly-tpu")
SKIP_ENV = "TFPAR_SKIP_VERSION_CHECK"
COMMANDS = ("tfpar-train", "tfpar-launch")


class UnsupportedVersions(ImportError):
    """TensorFlow or Keras is missing or outside the supported range; the message says which."""


def requirement(bounds):
    """``(oldest, newest)`` major.minor -> a pip specifier, e.g. ``>=2.20,<2.22``."""
    major, minor = bounds[1].split(".")
    return f">={bounds[0]},<{major}.{int(minor) + 1}"


def supported():
    """The supported range in words, for messages and docs."""
    return (f"TensorFlow {TENSORFLOW[0]}-{TENSORFLOW[1]} (tensorflow, tensorflow-cpu or tensorflow-tpu) "
            f"with Keras {KERAS[0]}-{KERAS[1]}")


def _minor(version):
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _within(version, bounds):
    have = _minor(version)
    return have is not None and _minor(bounds[0]) <= have <= _minor(bounds[1])


def installed(distributions=None):
    """``{distribution: version}`` for every TensorFlow distribution and Keras installed."""
    found = {}
    for name in (distributions or TENSORFLOW_DISTRIBUTIONS + ("keras",)):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def problem(found=None, tensorflow_importable=None):
    """One sentence saying what is wrong with the installed TensorFlow/Keras, or ``None``."""
    found = installed() if found is None else found
    tensorflows = {k: v for k, v in found.items() if k != "keras"}
    keras = found.get("keras")
    want = f"tfpar {_own_version()} supports {supported()}"
    if not tensorflows:
        if tensorflow_importable is None:
            tensorflow_importable = importlib.util.find_spec("tensorflow") is not None
        if tensorflow_importable:
            return None if keras is None or _within(keras, KERAS) else \
                f"Keras {keras} is installed, but {want}; run: pip install 'keras{requirement(KERAS)}'."
        return (f"No TensorFlow is installed, but {want}; install one with pip install 'tfpar[cpu]', "
                f"'tfpar[and-cuda]' (NVIDIA GPUs) or 'tfpar[tpu]' (TPU VMs).")
    if len(tensorflows) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(tensorflows.items()))
        return (f"Several TensorFlow distributions are installed ({listed}) and overwrite each other's files; "
                f"{want}: keep one (pip uninstall the others, then pip install --force-reinstall the one you keep).")
    (name, version), = tensorflows.items()
    if not _within(version, TENSORFLOW):
        return f"{name} {version} is installed, but {want}."
    if keras is None:
        return f"{name} {version} is installed without Keras, but {want}; run: pip install 'keras{requirement(KERAS)}'."
    if not _within(keras, KERAS):
        return (f"{name} {version} with Keras {keras} is installed, but {want}; "
                f"run: pip install 'keras{requirement(KERAS)}'.")
    return None


def _own_version():
    return __version__


def _is_command(argv):
    """A tfpar console script, or ``python -m tfpar.<module>`` (argv[0] is "-m" while the package loads)."""
    return bool(argv) and (os.path.basename(argv[0]) in COMMANDS or argv[0] == "-m")


def require(environ=None, argv=None, found=None):
    """Stop here when the installed TensorFlow/Keras are unsupported.

    A ``tfpar-train`` / ``tfpar-launch`` command prints the sentence and exits
    with status 2 (no traceback); ``import tfpar`` raises ``UnsupportedVersions``.
    """
    env = os.environ if environ is None else environ
    if env.get(SKIP_ENV, "") not in ("", "0"):
        return
    message = problem(found)
    if message is None:
        return
    if _is_command(sys.argv if argv is None else argv):
        print(f"tfpar: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise UnsupportedVersions(message)
