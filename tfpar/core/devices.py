"""Devices and strategy kinds: the facts every layer asks about a ``tf.distribute`` strategy.

Kept at the bottom so that the Keras fixes, the runtime and the parallelism
mechanisms can all ask "is this multi-worker?" without importing the
strategy factory that uses them.
"""

import tensorflow as tf


def configure_virtual_cpus(count):
    """Split the first physical CPU into ``count`` logical devices.

    This is how mirrored and DTensor code runs on a machine with no GPU. It
    must happen before TensorFlow initialises its devices; asking afterwards
    for a different count raises ``ValueError``.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"virtual_cpus must be a positive int, got {count!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == count:
            return
        raise ValueError(
            f"virtual_cpus={count} was asked after TensorFlow initialised its devices "
            f"(it has {have} CPU device(s)); set it before any other TensorFlow call."
        ) from err


def is_multi_worker(strategy):
    """True for a MultiWorkerMirroredStrategy that really spans several workers."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def is_parameter_server(strategy):
    """True for a ``ParameterServerStrategy`` (Keras 3 ``fit`` needs tfpar's coordinator loop there)."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_mirrored(strategy):
    """True for ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``: replicas that all-reduce gradients."""
    return isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy))


def any_worker_fn(strategy):
    """A tf.function returning the SUM of a flag over all replicas: every worker gets the same answer."""

    @tf.function
    def any_worker(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return any_worker


def barrier(strategy):
    """Return once every worker of ``strategy`` got here (one scalar all-reduce)."""
    any_worker_fn(strategy)(tf.constant(0.0))


def local_devices():
    """Names of this process's accelerators, or its CPUs when it has none."""
    for kind in ("GPU", "CPU"):
        devices = [d.name for d in tf.config.list_logical_devices(kind)]
        if devices:
            return devices
    return []
