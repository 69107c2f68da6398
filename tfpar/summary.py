"""Run summaries: a checksum of the weights and atomic JSON writes."""

import hashlib
import json
import os
import platform
import tempfile

import numpy as np


def weights_checksum(model):
    """sha256 of every weight's float32 bytes, in model order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for w in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(w.numpy(), dtype=np.float32)).tobytes())
    return digest.hexdigest()


def versions():
    import keras
    import tensorflow as tf

    import tfpar

    return {"tfpar": tfpar.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def write_json_atomic(path, payload):
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
