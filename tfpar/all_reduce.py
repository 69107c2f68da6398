"""Gradient all-reduce in bfloat16: half the bytes between replicas each step.

With ``MultiWorkerMirroredStrategy`` on CPUs the float32 gradient all-reduce
runs after the backward pass and does not overlap it: a TensorBoard trace of
two one-core workers training ResNet-50 (128 px, 16 images each) showed
2,175 ms of compute and 701 ms of all-reduce per 2,882 ms step. Summing the
gradients in bfloat16 halved the all-reduce (369 ms) and the step fell to
2,362 ms (benchmarks/README.md).

bfloat16 keeps float32's exponent range, so a sum cannot overflow the way a
float16 one can (and no loss-scale check would see such an overflow: Keras
checks the local gradients before they are summed). It keeps 8 bits of
mantissa, so each summed gradient is rounded to ~0.4%; the weights, the
optimizer state and the update stay float32. It is opt-in.

Keras 3 sums gradients over replicas in one place, the TensorFlow optimizer's
``_all_reduce_sum_gradients``. ``use_bfloat16`` wraps that method on the one
optimizer instance it is given (no subclassing) and checks that it exists, so
a Keras that renames it fails with one sentence instead of silently sending
float32.
"""

DTYPES = ("float32", "bfloat16")
_HOOK = "_all_reduce_sum_gradients"  # keras/src/backend/tensorflow/optimizer.py, Keras 3.x


def use_bfloat16(optimizer):
    """Make ``optimizer`` (or the one a LossScaleOptimizer wraps) all-reduce gradients in bfloat16.

    Args:
      optimizer: a compiled model's Keras 3 optimizer, built under the strategy's scope.

    Returns:
      The optimizer instance whose all-reduce now runs in bfloat16.

    Raises:
      RuntimeError: this Keras has no gradient all-reduce hook to wrap.
    """
    import keras
    import tensorflow as tf

    target = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer delegates the update
    original = getattr(target, _HOOK, None)
    if original is None:
        raise RuntimeError(f"all_reduce_dtype=bfloat16 needs the Keras 3 TensorFlow optimizer's {_HOOK}, "
                           f"which Keras {keras.__version__} lacks; use all_reduce_dtype=float32.")
    if getattr(original, "tfpar_all_reduce_dtype", None) == "bfloat16":
        return target

    def all_reduce_sum_gradients(grads_and_vars):
        pairs = list(grads_and_vars)
        narrow = [(tf.cast(g, tf.bfloat16) if g is not None and g.dtype == tf.float32 else g, v) for g, v in pairs]
        reduced = original(narrow)
        return [(r if g is None or r is None else tf.cast(r, g.dtype), v) for (r, v), (g, _) in zip(reduced, pairs)]

    all_reduce_sum_gradients.tfpar_all_reduce_dtype = "bfloat16"
    setattr(target, _HOOK, all_reduce_sum_gradients)
    return target


def apply(optimizer, dtype, replicas):
    """Install ``dtype`` ("float32" leaves Keras alone) when there is an all-reduce to make smaller.

    Returns the dtype in effect: "float32" with one replica, where nothing is summed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"all_reduce_dtype must be one of: {', '.join(DTYPES)}; got {dtype!r}.")
    if dtype == "float32" or replicas < 2:
        return "float32"
    use_bfloat16(optimizer)
    return dtype
