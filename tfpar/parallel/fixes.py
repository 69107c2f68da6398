"""The whole ``tfpar.compat.apply()``: the Keras fixes of ``tfpar.kerasfix`` plus those that need this layer.

``kerasfix`` sits below the parallel mechanisms, so a fix built on them
(Keras's ``keras.distribution`` API on DTensor) cannot live there; this
``apply`` runs kerasfix's and then installs it, with the same gating
(TensorFlow backend, a Keras that still has the prototype,
``TFPAR_COMPAT_DISABLE``), idempotence and one log line.
"""

import logging

from tfpar.kerasfix import compat

log = logging.getLogger("tfpar")

KERAS_DISTRIBUTION = compat.ABOVE[0]
_applied = []


def apply(environ=None):
    """Install every fix the installed Keras still needs; return the names now active. Safe to repeat."""
    names = compat.apply(environ)
    if not _applied and KERAS_DISTRIBUTION not in compat.disabled(environ) and compat._keras_needs_fixes():
        from tfpar.parallel.sharding import keras_distribution

        if keras_distribution.needed():
            keras_distribution.install()
            _applied.append(KERAS_DISTRIBUTION)
            log.info("tfpar.compat: applied %s (keras-team/keras#18473): keras.distribution DataParallel, "
                     "ModelParallel and LayoutMap distribute on TensorFlow through DTensor", KERAS_DISTRIBUTION)
    return sorted(names + _applied)


def applied():
    """Names of the fixes installed in this process."""
    return sorted(compat.applied() + _applied)
