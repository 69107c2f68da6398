"""Precision policies: ``apply(policy, strategy)`` sets the global Keras dtype policy.

Models read the global policy when they are built, so call this before
building. Loss scaling for float16 happens in ``compile`` (Keras wraps the
optimizer in ``LossScaleOptimizer``); ``loss_scale_optimizer`` gives a fixed
scale on request.
"""

import logging
import os

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


def onednn_enabled(environ=None):
    """TF's x86 CPU build computes bf16 through oneDNN, on unless TF_ENABLE_ONEDNN_OPTS=0."""
    env = os.environ if environ is None else environ
    return env.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")


def offer(strategy_name="auto"):
    """One sentence when this machine likely has a faster mixed policy than float32, else None.

    For ``tfpar-train`` runs that left ``--precision`` at float32. Reads only
    /proc and the strategy name, never TensorFlow's devices: it runs before
    ``tfpar.cluster.pin_gpus`` may set CUDA_VISIBLE_DEVICES.
    """
    from tfpar.core import quiet

    if strategy_name == "tpu":
        return "TPUs compute in bfloat16: --precision=auto (mixed_bfloat16) trains faster."
    if quiet.nvidia_driver_present():
        return ("NVIDIA GPUs of compute capability 7.0 or newer (V100, T4, A100, H100) train faster in "
                "mixed_float16: --precision=auto picks it on those.")
    if cpu_has_native_bf16() and onednn_enabled():
        return ("this CPU computes bfloat16 natively (AVX512_BF16/AMX): --precision=auto (mixed_bfloat16) "
                "trains faster here.")
    return None


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
    strategy = strategy or tf.distribute.get_strategy()
    if policy != "auto":
        return policy
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        return "mixed_bfloat16"
    capability = _gpu_compute_capability()
    if capability is not None:
        return "mixed_float16" if capability >= (7, 0) else "float32"
    # On CPUs bf16 is only faster with native instructions reached through
    # oneDNN, and with tfpar's fused BatchNormalization (DESIGN.md items 8, 10).
    return "mixed_bfloat16" if cpu_has_native_bf16() and onednn_enabled() else "float32"


# What each policy computes in, for the table --autotune prints: a faster policy changes the numerics too.
NUMERICS = {"float32": "float32 compute and weights",
            "mixed_bfloat16": "bfloat16 compute, float32 weights",
            "mixed_float16": "float16 compute with loss scaling, float32 weights"}


def candidates(strategy=None):
    """The policies ``--precision=auto --autotune`` times here, ``auto``'s rule first.

    float32 and the mixed policy the hardware can run: bfloat16 on TPUs and CPUs (where it is only fast
    with native instructions, so the trial decides), float16 on GPUs of compute capability 7.0+ and
    bfloat16 too from 8.0 (Ampere). A GPU older than 7.0 has no fast half type: float32 only.
    """
    strategy = strategy or tf.distribute.get_strategy()
    rule = resolve("auto", strategy)
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        found = ["mixed_bfloat16", "float32"]
    else:
        capability = _gpu_compute_capability()
        if capability is None:
            found = ["float32", "mixed_bfloat16"]
        else:
            found = ["float32"] + (["mixed_float16"] if capability >= (7, 0) else []) + (
                ["mixed_bfloat16"] if capability >= (8, 0) else [])
    return [rule] + [name for name in found if name != rule]


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
    # Keras has no fixed-scale mode: "fixed" here never grows. On overflow
    # Keras still halves the scale and skips that step, which is what keeps a
    # non-finite update out of the weights.
    growth = 2**62 if not dynamic else 2000
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=initial_scale, dynamic_growth_steps=growth)
