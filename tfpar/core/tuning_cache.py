"""Where autotune choices are kept between runs: one JSON file per run shape, under the user's cache dir.

A choice holds for one shape of run: the model (its signature: layers,
weight shapes and dtypes, input and batch shapes, optimizer), the devices
(kind and count), the replicas, and the settings that were left to tune.
The file name is a hash of that shape, so a changed model or device set
simply finds no file and tunes again. The versions (tfpar, TensorFlow,
Keras) are written inside the file rather than hashed into its name: a file
from other versions is found, refused with one warning line, and replaced
by a fresh tuning, since a new XLA or Keras can change which setting is
fastest.

The directory is ``$TFPAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/tfpar``, else
``~/.cache/tfpar``; files go in its ``autotune/`` folder and are written
atomically (``tfpar.core.summary.write_json_atomic``).
"""

import hashlib
import json
import os

from tfpar.core import summary

ENV = "TFPAR_CACHE_DIR"
FORMAT = 1


def directory(environ=None):
    """The folder autotune files live in (not created here)."""
    env = os.environ if environ is None else environ
    root = env.get(ENV) or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                        "tfpar")
    return os.path.join(root, "autotune")


def key(shape):
    """The hash naming ``shape``'s file; ``shape`` is a JSON-able dict (model, devices, replicas, space)."""
    text = json.dumps(shape, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def path_for(shape, environ=None):
    return os.path.join(directory(environ), f"{key(shape)}.json")


class Stale(Exception):
    """A cache file exists for this shape but was written by other versions (or is unreadable)."""


def load(shape, versions, environ=None):
    """The cached entry for ``shape`` (a dict with ``choice``), or None when there is none.

    Raises ``Stale`` with one sentence when the file is from other versions or cannot be read.
    """
    path = path_for(shape, environ)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError) as err:
        raise Stale(f"autotune cache file {path} cannot be read ({err}); re-tuning.") from None
    if entry.get("format") != FORMAT or entry.get("shape") != json.loads(json.dumps(shape, default=str)):
        raise Stale(f"autotune cache file {path} holds another run shape; re-tuning.")
    theirs = entry.get("versions") or {}
    if any(theirs.get(name) != value for name, value in versions.items()):
        written = ", ".join(f"{name} {theirs.get(name)}" for name in versions)
        here = ", ".join(f"{name} {value}" for name, value in versions.items())
        raise Stale(f"autotune cache file {path} was written by {written}, not {here}; re-tuning.")
    return entry


def store(shape, versions, result, environ=None):
    """Write ``result`` (a ``tuning.Result`` as a dict) for ``shape``; returns the file's path."""
    path = path_for(shape, environ)
    summary.write_json_atomic(path, {"format": FORMAT, "shape": shape, "versions": dict(versions), **result})
    return path


def find(match, versions, environ=None):
    """The newest entry of these ``versions`` whose shape ``match(shape)`` accepts, or None.

    For ``jit_compile=auto`` without ``--autotune``: any tuning of this model
    on these devices says whether XLA paid off, whatever else was tuned.
    """
    folder = directory(environ)
    try:
        names = sorted(os.listdir(folder), key=lambda n: _mtime(os.path.join(folder, n)), reverse=True)
    except OSError:
        return None
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if entry.get("format") == FORMAT and entry.get("versions") == dict(versions) and match(entry.get("shape", {})):
            entry["path"] = os.path.join(folder, name)
            return entry
    return None


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
