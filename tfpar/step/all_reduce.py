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
``_all_reduce_sum_gradients``. tfpar wraps that method once on the one
optimizer instance it is given (no subclassing; ``tfpar.step.reduce``) and
checks that it exists, so a Keras that renames it fails with one sentence
instead of silently sending float32.

Buckets (``buckets(model, mb)``, ``--all_reduce_bucket_mb``): Keras sums every
gradient in one batch after the whole backward pass. ``plan`` groups them
from the last layer back into buckets of about ``mb`` MiB, and
``sum_in_buckets`` makes one ``ReplicaContext.all_reduce`` call per bucket,
so each collective depends only on its own gradients and can run while the
backward pass computes the earlier ones (PyTorch DDP's buckets, Horovod's
tensor fusion). The bucket size goes into the model's step plan, and
tfpar's train step (``tfpar.step.builder.apply``) sums them before
``apply_gradients``; the optimizer's hook then passes them through. TensorFlow's executor needs two or more inter-op
threads for this: with one it launches a collective only after the chain of
compute ops it is running (traced on a one-core worker).
"""

import logging

from tfpar.core.devices import is_mirrored
from tfpar.step import builder, reduce
from tfpar.step import plan as plans

log = logging.getLogger("tfpar")

DTYPES = reduce.DTYPES
DEFAULT_BUCKET_MB = 25.0  # PyTorch DDP's default bucket cap; ResNet-50's 102 MB of gradients -> 5 buckets
plan = reduce.group  # bucket grouping: plan(sizes, bucket_bytes) -> indices per bucket, last layer first
sum_in_buckets = reduce.sum_in_buckets


def use_bfloat16(optimizer):
    """Make ``optimizer`` (or the one a LossScaleOptimizer wraps) all-reduce gradients in bfloat16.

    Args:
      optimizer: a compiled model's Keras 3 optimizer, built under the strategy's scope.

    Returns:
      The optimizer instance whose all-reduce now runs in bfloat16.

    Raises:
      RuntimeError: this Keras has no gradient all-reduce hook to wrap.
    """
    reduce.require_hook(optimizer, "all_reduce_dtype=bfloat16", "float32")
    reduce.of(optimizer).dtype = "bfloat16"
    return reduce.update_hook(optimizer)


def apply(optimizer, dtype, replicas):
    """Install ``dtype`` ("float32" leaves Keras alone) when there is an all-reduce to make smaller.

    Returns the dtype in effect: "float32" with one replica, where nothing is summed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"all_reduce_dtype must be one of: {', '.join(DTYPES)}; got {dtype!r}.")
    if dtype == "float32" or replicas < 2:
        if reduce.of(optimizer).dtype != "float32":  # undo an earlier bfloat16 (autotune's trials)
            reduce.of(optimizer).dtype = "float32"
            reduce.update_hook(optimizer)
        return "float32"
    use_bfloat16(optimizer)
    return dtype


def _check_bucket_mb(bucket_mb):
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb >= 0:
        raise ValueError(f"all_reduce_bucket_mb must be a number >= 0 (0: one all-reduce), got {bucket_mb!r}.")


def use_buckets(optimizer, bucket_mb=DEFAULT_BUCKET_MB):
    """Make ``optimizer`` (or the one a LossScaleOptimizer wraps) all-reduce gradients in buckets.

    Replaces Keras's one batched all-reduce with ``sum_in_buckets``, in the
    dtype chosen (``use_bfloat16`` before or after). ``bucket_mb=0`` restores
    Keras's single batch in that dtype. Returns the optimizer instance whose
    all-reduce changed.
    """
    _check_bucket_mb(bucket_mb)
    reduce.require_hook(optimizer, "all_reduce_bucket_mb", "0")
    reduce.of(optimizer).bucket_bytes = int(bucket_mb * 2 ** 20) if bucket_mb > 0 else None
    return reduce.update_hook(optimizer)


def settings(optimizer):
    """``(dtype, bucket bytes)`` of ``optimizer``'s all-reduce (bucket bytes None: Keras's single batch)."""
    reduction = reduce.of(optimizer)
    return reduction.dtype, reduction.bucket_bytes


def buckets(model, bucket_mb=DEFAULT_BUCKET_MB):
    """All-reduce ``model``'s gradients in buckets of ``bucket_mb`` MiB, last layers first.

    The Python entry point of ``--all_reduce_bucket_mb``. Call after
    ``compile``; the order among ``apply``, ``tfpar.step.xla.enable``,
    ``tfpar.step.steps.accumulate`` and ``tfpar.step.stragglers.enable`` does not
    matter. The model then trains with tfpar's step (``tfpar.step.builder``):
    each bucket's all-reduce can run while the backward pass computes the
    earlier layers' gradients, and the BatchNormalization statistics of a
    step are averaged in one collective. ``bucket_mb=0`` keeps Keras's single
    batch. With one replica, or a strategy other than mirrored and
    multi-worker, the model is left alone.

    Returns the bucket size in effect in MiB (0 with one replica or ``bucket_mb=0``).
    """
    _check_bucket_mb(bucket_mb)
    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.step.all_reduce.buckets needs a compiled model; call model.compile(...) first.")
    import tensorflow as tf

    strategy = model.distribute_strategy
    on = bucket_mb > 0 and is_mirrored(strategy) and strategy.num_replicas_in_sync > 1  # TPUs sum inside XLA; PS does not
    use_buckets(model.optimizer, bucket_mb if on else 0)
    plans.of(model).reduction = reduce.of(model.optimizer)
    if on and tf.config.threading.get_inter_op_parallelism_threads() == 1:
        log.warning("tfpar.step.all_reduce: with one inter-op thread TensorFlow starts each gradient bucket's all-reduce "
                    "only after the backward pass, so buckets cannot overlap it; use 2 or more "
                    "(tf.config.threading.set_inter_op_parallelism_threads).")
    builder.install(model)
    return bucket_mb if on else 0
