"""tfpar: make Keras 3 training run across GPUs, workers, TPUs and DTensor meshes.

The top-level modules are the public API, each usable on its own, in the order of one run:
``cluster`` → ``strategies`` → ``precision`` → ``models`` → ``data`` → ``train``; also ``compat``,
``pipeline``, ``sharding``, ``ray`` and ``cli``. The code lives in layered packages (docs/architecture.md):
``core`` → ``step`` → ``kerasfix`` → ``runtime`` → ``parallel`` → ``run``, each importing only the ones before it.
"""

from tfpar.core import versions as _versions
from tfpar.core.versions import __version__  # noqa: F401

_versions.require()  # one sentence and no further import when TensorFlow/Keras are unsupported
