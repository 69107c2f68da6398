"""A quiet start for tfpar's command-line tools: TensorFlow's C++ log at a chosen level.

TensorFlow 2.21 prints its start-up lines (oneDNN, "Could not find cuda
drivers", absl's "All log messages before absl::InitializeLog()" notice,
some of them twice) while its libraries load, before it reads
``TF_CPP_MIN_LOG_LEVEL``, so setting the variable hides none of them. On a
CUDA build with no NVIDIA driver it then logs ``E... failed call to cuInit``
at the first device query: an ERROR line for the normal state of a CPU
machine.

``start_tensorflow(level)`` sets ``TF_CPP_MIN_LOG_LEVEL`` and imports
TensorFlow (and, on such a machine, makes that first device query) with file
descriptor 2 sent to a temporary file; it then writes back every line
``keep`` lets through. The same ``keep`` filters what ``tfpar-launch``
streams from its tasks. Level 2, the default, hides INFO and WARNING and
keeps ERROR and FATAL: real errors still show. Level 0 shows everything.

Only ``tfpar-train``, ``tfpar-launch`` and its servers call this; the Python
API leaves the environment as the user set it.
"""

import glob
import os
import re
import sys
import tempfile

ENV = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = 2  # TF's own meaning: 1 hides INFO, 2 also WARNING, 3 also ERROR; FATAL always shows
LEVELS = (0, 1, 2, 3)
# absl/TF C++ log prefix: severity letter, MMDD, time, thread id, file:line]
LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")  # before absl init the seconds are epoch seconds
PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
NO_DRIVER_CUINIT = "failed call to cuInit"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def level(flag_value=None, environ=None):
    """The level to use: the flag if given, else ``TF_CPP_MIN_LOG_LEVEL`` if the user set it, else 2."""
    if flag_value is not None:
        return int(flag_value)
    env = os.environ if environ is None else environ
    try:
        value = int(env.get(ENV, ""))
    except ValueError:
        return DEFAULT_LEVEL
    return value if value in LEVELS else DEFAULT_LEVEL


def nvidia_driver_present():
    """True when this machine has an NVIDIA kernel driver (or WSL's GPU bridge): cuInit can then mean something."""
    return (os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))
            or os.path.exists("/dev/dxg"))


def keep(line, min_level, driver_present=None):
    """Whether ``line`` of TensorFlow's stderr is shown at ``min_level``.

    C++ log lines below the level go, and so does absl's pre-initialisation
    notice; FATAL lines always stay. At level >= 1 the cuInit failure goes
    too when the machine has no NVIDIA driver (it says only that there is no
    GPU, which the INFO line before it said). Every other line stays.
    """
    if min_level <= 0:
        return True
    if line.startswith(PRE_INIT_NOTICE):
        return False
    match = LOG_LINE.match(line)
    if not match:
        return True
    severity = _SEVERITY[match.group(1)]
    if severity >= 3:
        return True
    if severity < min_level:
        return False
    if NO_DRIVER_CUINIT in line:
        return nvidia_driver_present() if driver_present is None else driver_present
    return True


def start_tensorflow(min_level=None):
    """Import TensorFlow with its C++ log at ``min_level`` (default: ``level()``), start-up lines included.

    Sets ``TF_CPP_MIN_LOG_LEVEL`` for this process and its children. A no-op
    beyond that when TensorFlow is already imported or the level is 0.
    """
    min_level = level() if min_level is None else min_level
    os.environ[ENV] = str(min_level)
    if "tensorflow" in sys.modules or min_level <= 0:
        import tensorflow  # noqa: F401
        return
    driver = nvidia_driver_present()
    sys.stderr.flush()
    saved = os.dup(2)
    capture = tempfile.TemporaryFile()
    try:
        os.dup2(capture.fileno(), 2)
        import tensorflow as tf

        if not driver and tf.sysconfig.get_build_info().get("is_cuda_build"):
            # The cuInit line comes at the first device query; make it here. Only where no driver is
            # present: with one, CUDA_VISIBLE_DEVICES may still be set (tfpar.cluster.pin_gpus).
            tf.config.list_physical_devices("GPU")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
        capture.close()
        shown = "".join(line for line in text.splitlines(keepends=True) if keep(line, min_level, driver))
        if shown:
            sys.stderr.write(shown)
            sys.stderr.flush()
