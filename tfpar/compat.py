"""Public API: ``tfpar.compat.apply()`` installs the Keras 3 fixes this Keras still needs (``tfpar.kerasfix``)."""

from tfpar.kerasfix.compat import DISABLE_ENV, FIXES, NAMES, PS_FIT, applied, apply, ps_fit_needed

__all__ = ["DISABLE_ENV", "FIXES", "NAMES", "PS_FIT", "applied", "apply", "ps_fit_needed"]
