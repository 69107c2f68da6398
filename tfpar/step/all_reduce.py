"""The gradient all-reduce: in bfloat16 (half the bytes), and in buckets that overlap the backward pass.

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

Buckets (``buckets(model, mb)``, ``--all_reduce_bucket_mb``): Keras sums every
gradient in one batch after the whole backward pass. ``plan`` groups them
from the last layer back into buckets of about ``mb`` MiB, and
``sum_in_buckets`` makes one ``ReplicaContext.all_reduce`` call per bucket,
so each collective depends only on its own gradients and can run while the
backward pass computes the earlier ones (PyTorch DDP's buckets, Horovod's
tensor fusion). ``tfpar.steps`` sums them before ``apply_gradients``
(``sum_before_apply``) and the optimizer's hook then passes them through
(``summed_already``). TensorFlow's executor needs two or more inter-op
threads for this: with one it launches a collective only after the chain of
compute ops it is running (traced on a one-core worker).
"""

import contextlib
import logging
import threading

log = logging.getLogger("tfpar")

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
    if getattr(original, "tfpar_bucket_bytes", None) is not None:  # use_buckets' hook casts per bucket itself
        original.tfpar_all_reduce_dtype = "bfloat16"
        return target

    def all_reduce_sum_gradients(grads_and_vars):
        pairs = list(grads_and_vars)
        narrow = [(tf.cast(g, tf.bfloat16) if g is not None and g.dtype == tf.float32 else g, v) for g, v in pairs]
        reduced = original(narrow)
        return [(r if g is None or r is None else tf.cast(r, g.dtype), v) for (r, v), (g, _) in zip(reduced, pairs)]

    all_reduce_sum_gradients.tfpar_all_reduce_dtype = "bfloat16"
    all_reduce_sum_gradients.tfpar_keras_hook = original
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


# --------------------------------------------------------------------------- buckets

DEFAULT_BUCKET_MB = 25.0  # PyTorch DDP's default bucket cap; ResNet-50's 102 MB of gradients -> 5 buckets
_passing = threading.Lock()


def plan(sizes, bucket_bytes):
    """Indices of gradients grouped into all-reduce buckets, last gradient first.

    ``sizes`` are the gradients' bytes in layer order (``None``: no gradient,
    left out). Walking from the last layer back, a bucket is closed once it
    holds at least ``bucket_bytes``, the rule of PyTorch DDP's bucket cap and
    of TensorFlow's ``bytes_per_pack``: the gradients of the last layers, which
    the backward pass makes first, are summed first. ``bucket_bytes=0`` gives
    one bucket (Keras's single batch).
    """
    buckets, current, filled = [], [], 0
    for i in reversed(range(len(sizes))):
        if sizes[i] is None:
            continue
        current.append(i)
        filled += sizes[i]
        if bucket_bytes and filled >= bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


def _nbytes(g):
    import tensorflow as tf

    if g is None:
        return None
    g = tf.convert_to_tensor(g) if not isinstance(g, tf.IndexedSlices) else g.values
    n = g.shape.num_elements()
    return (n if n is not None else 0) * g.dtype.size


def sum_in_buckets(grads, bucket_bytes, dtype="float32"):
    """Sum ``grads`` (a list, ``None`` allowed) over the replicas, one all-reduce per bucket.

    Runs in a replica context. Each bucket is its own
    ``ReplicaContext.all_reduce`` call, so its collective depends only on its
    own gradients and TensorFlow's executor can start it while the backward
    pass still computes earlier layers' gradients. Within a bucket TF packs
    the tensors into one collective (``CommunicationOptions.bytes_per_pack``
    set to the bucket's size).
    ``dtype="bfloat16"`` sums float32 gradients in bfloat16, as ``use_bfloat16``.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return list(grads)
    sizes = [_nbytes(g) for g in grads]
    out = list(grads)
    for bucket in plan(sizes, bucket_bytes):
        values = [grads[i] for i in bucket]
        narrow = [tf.cast(g, tf.bfloat16) if dtype == "bfloat16" and g.dtype == tf.float32 else g for g in values]
        # A pack as large as the bucket: one collective per bucket, whatever the strategy's own bytes_per_pack.
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=sum(sizes[i] for i in bucket) + 1)
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, narrow, options=options)
        for i, g, r in zip(bucket, values, reduced):
            out[i] = tf.cast(r, g.dtype) if r.dtype != g.dtype else r
    return out


def use_buckets(optimizer, bucket_mb=DEFAULT_BUCKET_MB):
    """Make ``optimizer`` (or the one a LossScaleOptimizer wraps) all-reduce gradients in buckets.

    Replaces Keras's one batched all-reduce (``_all_reduce_sum_gradients``)
    with ``sum_in_buckets``, in the dtype already chosen (``use_bfloat16``
    before or after). ``bucket_mb=0`` restores Keras's single batch in that
    dtype. Returns the optimizer instance whose all-reduce changed.
    """
    import keras

    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or bucket_mb < 0:
        raise ValueError(f"all_reduce_bucket_mb must be a number >= 0 (0: one all-reduce), got {bucket_mb!r}.")
    target = getattr(optimizer, "inner_optimizer", optimizer)
    current = getattr(target, _HOOK, None)
    if current is None:
        raise RuntimeError(f"all_reduce_bucket_mb needs the Keras 3 TensorFlow optimizer's {_HOOK}, "
                           f"which Keras {keras.__version__} lacks; use all_reduce_bucket_mb=0.")
    original = getattr(current, "tfpar_keras_hook", current)  # Keras's own, under any tfpar wrapper
    dtype = getattr(current, "tfpar_all_reduce_dtype", "float32")
    if bucket_mb == 0:
        vars(target).pop(_HOOK, None)
        if dtype == "bfloat16":
            use_bfloat16(target)
        return target
    bucket_bytes = int(bucket_mb * 2 ** 20)

    def all_reduce_sum_gradients(grads_and_vars):
        pairs = list(grads_and_vars)
        if getattr(target, "_tfpar_summed_already", 0):  # tfpar.steps summed them before apply_gradients
            return pairs
        summed = sum_in_buckets([g for g, _ in pairs], bucket_bytes, all_reduce_sum_gradients.tfpar_all_reduce_dtype)
        return list(zip(summed, [v for _, v in pairs]))

    all_reduce_sum_gradients.tfpar_all_reduce_dtype = dtype
    all_reduce_sum_gradients.tfpar_bucket_bytes = bucket_bytes
    all_reduce_sum_gradients.tfpar_keras_hook = original
    setattr(target, _HOOK, all_reduce_sum_gradients)
    return target


def bucket_bytes(optimizer):
    """The bucket size ``use_buckets`` gave ``optimizer`` in bytes, or None (Keras's single batch)."""
    target = getattr(optimizer, "inner_optimizer", optimizer)
    return getattr(getattr(target, _HOOK, None), "tfpar_bucket_bytes", None)


def sum_before_apply(optimizer, grads):
    """``grads`` summed over replicas in ``optimizer``'s buckets, for a step that applies them itself.

    Pair with ``summed_already(optimizer)`` around ``apply_gradients`` so the
    optimizer does not sum them again.
    """
    target = getattr(optimizer, "inner_optimizer", optimizer)
    hook = getattr(target, _HOOK)
    return sum_in_buckets(list(grads), hook.tfpar_bucket_bytes, hook.tfpar_all_reduce_dtype)


@contextlib.contextmanager
def summed_already(optimizer):
    """While open, ``optimizer``'s bucketed all-reduce passes gradients through (they are summed).

    A counter on the optimizer, not a thread-local: MirroredStrategy may run
    the optimizer's replica functions on other threads than the step's.
    """
    target = getattr(optimizer, "inner_optimizer", optimizer)
    with _passing:
        target._tfpar_summed_already = getattr(target, "_tfpar_summed_already", 0) + 1
    try:
        yield
    finally:
        with _passing:
            target._tfpar_summed_already -= 1


def buckets(model, bucket_mb=DEFAULT_BUCKET_MB):
    """All-reduce ``model``'s gradients in buckets of ``bucket_mb`` MiB, last layers first.

    The Python entry point of ``--all_reduce_bucket_mb``. Call after
    ``compile`` (and after ``apply``/``use_bfloat16``, ``tfpar.xla.enable`` and
    ``tfpar.steps.accumulate``, in any order among those). The model then
    trains with tfpar's step (``tfpar.steps``): each bucket's all-reduce can
    run while the backward pass computes the earlier layers' gradients, and
    the BatchNormalization statistics of a step are averaged in one
    collective. ``bucket_mb=0`` keeps Keras's single batch. With one replica,
    or a strategy other than mirrored and multi-worker, the model is left alone.

    Returns the bucket size in effect in MiB (0 with one replica or ``bucket_mb=0``).
    """
    from tfpar.step import steps

    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or bucket_mb < 0:
        raise ValueError(f"all_reduce_bucket_mb must be a number >= 0 (0: one all-reduce), got {bucket_mb!r}.")
    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.all_reduce.buckets needs a compiled model; call model.compile(...) first.")
    import tensorflow as tf

    strategy = model.distribute_strategy
    mirrored = isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy))
    on = bucket_mb > 0 and mirrored and strategy.num_replicas_in_sync > 1  # TPUs sum inside XLA; PS does not
    use_buckets(model.optimizer, bucket_mb if on else 0)
    model._tfpar_bucketed = on
    if on and tf.config.threading.get_inter_op_parallelism_threads() == 1:
        log.warning("tfpar.all_reduce: with one inter-op thread TensorFlow starts each gradient bucket's all-reduce "
                    "only after the backward pass, so buckets cannot overlap it; use 2 or more "
                    "(tf.config.threading.set_inter_op_parallelism_threads).")
    steps.install(model)
    return bucket_mb if on else 0
