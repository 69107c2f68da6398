"""Precision policies: ``apply(policy, strategy)`` sets the global Keras dtype policy.

Models read the global policy when they are built, so call this before
building. Loss scaling for float16 happens in ``compile`` (Keras wraps the
optimizer in ``LossScaleOptimizer``); ``loss_scale_optimizer`` gives a fixed
scale on request.
"""

import logging

import keras
import tensorflow as tf

log = logging.getLogger("tfpar")

POLICIES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def cpu_has_native_bf16():
    """True when this x86 CPU computes bfloat16 natively (AVX512_BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _gpu_compute_capability():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("compute_capability")


def resolve(policy="auto", strategy=None):
    """The concrete policy name ``auto`` stands for on this machine."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown precision {policy!r}; choose one of: {', '.join(POLICIES)}.")
    if policy != "auto":
        return policy
    if strategy is not None and isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    capability = _gpu_compute_capability()
    if capability is not None:
        return "mixed_float16" if capability >= (7, 0) else "float32"
    # On CPUs bf16 is only worth it with native instructions and tfpar's fused
    # BatchNormalization (DESIGN.md items 8 and 10).
    return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"


def apply(policy="auto", strategy=None):
    """Set the global Keras dtype policy and return its name."""
    name = resolve(policy, strategy)
    keras.mixed_precision.set_global_policy(name)
    log.info("precision policy %s (asked: %s)", name, policy)
    return name


def loss_scale_optimizer(optimizer, initial_scale=2.0**15, dynamic=True):
    """Wrap ``optimizer`` for float16 training with a dynamic or fixed loss scale.

    ``compile`` already does this with a dynamic scale under ``mixed_float16``;
    use this for a fixed scale (``dynamic=False``) or another starting value.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    # A fixed scale is a dynamic one that never grows: it only shrinks on
    # overflow, which a fixed scale must also do to skip non-finite steps.
    growth = 2**62 if not dynamic else 2000
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=initial_scale, dynamic_growth_steps=growth)
