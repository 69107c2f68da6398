"""Public API: ``tfpar.strategies.create(name, **options)`` returns a plain ``tf.distribute.Strategy``.

The factory lives in ``tfpar.runtime.strategies``; the device helpers in ``tfpar.core.devices``.
"""

from tfpar.core.devices import configure_virtual_cpus, is_multi_worker, local_devices
from tfpar.runtime.strategies import NAMES, communication_options, create, describe, public_class

__all__ = ["NAMES", "communication_options", "configure_virtual_cpus", "create", "describe", "is_multi_worker",
           "local_devices", "public_class"]
