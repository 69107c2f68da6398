"""Run summaries: a checksum of the weights and atomic JSON writes."""

import hashlib
import json
import os
import platform
import tempfile

import numpy as np


def arrays_checksum(arrays):
    """sha256 of the arrays' float32 bytes, in order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for value in arrays:
        digest.update(np.ascontiguousarray(np.asarray(value, dtype=np.float32)).tobytes())
    return digest.hexdigest()


def weights_checksum(model):
    """``arrays_checksum`` of every weight of ``model``, in model order."""
    return arrays_checksum(w.numpy() for w in model.weights)


def versions():
    import keras
    import tensorflow as tf

    from tfpar.core.versions import __version__

    return {"tfpar": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def write_json_atomic(path, payload):
    """Write JSON to a temporary file beside ``path``, flush it to disk and rename it into place.

    The only JSON writer in tfpar: summaries, backup metadata and the entry tfpar adds to Keras's
    ``training_metadata.json`` appear whole or not at all.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
