"""tfpar: make Keras 3 training run across GPUs, workers, TPUs and DTensor meshes.

Each module does one step of the data flow and is usable on its own:
``cluster`` → ``strategies`` → ``precision`` → ``models`` → ``data`` → ``train``.
"""

__version__ = "0.1.0"

from tfpar import versions as _versions  # noqa: E402  (needs __version__ above)

_versions.require()  # one sentence and no further import when TensorFlow/Keras are unsupported
