"""Which devices the stages use, and moving each stage's variables onto its device."""

import tensorflow as tf


def resolve(devices, count, what="stages x replicas"):
    """``count`` device names: ``devices`` as given, else the local GPUs, else the logical CPUs.

    ``what`` says where ``count`` comes from, for the error.
    """
    if devices is None:
        found = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(found) < count:
            raise ValueError(
                f"The pipeline needs {count} devices ({what}) but this process has {len(found)}; "
                f"use fewer stages or replicas, or split the CPU with virtual_cpus={count}.")
        return found[:count]
    devices = list(devices)
    if len(devices) != count:
        raise ValueError(f"devices must name {what} = {count} devices, got {len(devices)}: {devices}.")
    return devices


def move_variables(variables, device):
    """Re-create each Keras variable's TF variable on ``device`` (same value, name and trainability).

    Keras creates a model's variables where it is built, usually one device;
    each stage's variables belong on the stage's device, so the optimizer's
    slots (colocated with them) and updates land there too.
    """
    for variable in variables:
        current = variable.value  # the tf.Variable
        if same_device(current.device, device):
            continue
        with tf.init_scope(), tf.device(device):
            moved = tf.Variable(current.read_value(), trainable=current.trainable,
                                name=current.name.split(":")[0], dtype=current.dtype)
        variable._value = moved  # private: keras.src.backend.tensorflow.core.Variable._value


def same_device(a, b):
    """Whether device names ``a`` and ``b`` name the same device ("/cpu:1" is ".../device:CPU:1").

    Job and task count only where both names give them: a stage on another task of a cluster
    (``/job:worker/replica:0/task:1/device:CPU:0``) is not this task's CPU:0.
    """
    a, b = tf.DeviceSpec.from_string(a or ""), tf.DeviceSpec.from_string(b or "")
    for field in ("job", "task"):
        if getattr(a, field) is not None and getattr(b, field) is not None and getattr(a, field) != getattr(b, field):
            return False
    return ((a.device_type or "").upper(), a.device_index or 0) == ((b.device_type or "").upper(), b.device_index or 0)
