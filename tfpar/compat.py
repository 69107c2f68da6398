"""Public API: ``tfpar.compat.apply()`` installs the Keras 3 fixes this Keras still needs (``tfpar.kerasfix``,
and Keras's ``keras.distribution`` on TensorFlow from ``tfpar.parallel.fixes``)."""

from tfpar.kerasfix.compat import ABOVE, DISABLE_ENV, FIXES, NAMES, PS_FIT, ps_fit_needed
from tfpar.parallel.fixes import applied, apply

__all__ = ["ABOVE", "DISABLE_ENV", "FIXES", "NAMES", "PS_FIT", "applied", "apply", "ps_fit_needed"]
