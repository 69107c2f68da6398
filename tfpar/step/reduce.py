"""How gradients are summed over replicas: in bfloat16 and/or in buckets, through one wrap of Keras's hook.

Keras 3 sums gradients over replicas in one place, the TensorFlow optimizer's
``_all_reduce_sum_gradients``. tfpar wraps that method on the one optimizer
instance (or the one a LossScaleOptimizer wraps) with one function reading
the optimizer's ``Reduction``: the dtype of the sum and the bucket size. The
model's ``StepPlan`` holds the same ``Reduction``; tfpar's train step sums in
buckets before ``apply_gradients`` and, while ``summed_already`` is open, the
hook passes the summed gradients through. The reasons and the measurements
are in ``tfpar.step.all_reduce``.
"""

import contextlib
import dataclasses
import threading
import weakref

DTYPES = ("float32", "bfloat16")
HOOK = "_all_reduce_sum_gradients"  # keras/src/backend/tensorflow/optimizer.py, Keras 3.x (internals HOOKS)

_REDUCTIONS = weakref.WeakKeyDictionary()  # optimizer -> Reduction
_passing = threading.Lock()


@dataclasses.dataclass
class Reduction:
    """How one optimizer sums gradients over replicas."""

    dtype: str = "float32"  # "bfloat16": float32 gradients summed in bfloat16
    bucket_bytes: int = None  # None: Keras's single all-reduce; 0: one bucket; else about this many bytes each
    passing: int = 0  # > 0 while a step applies gradients it summed itself (``summed_already``)


def target(optimizer):
    """The optimizer that makes the update (a LossScaleOptimizer delegates it to its inner one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def of(optimizer):
    """``optimizer``'s ``Reduction`` (Keras's float32 single all-reduce until changed)."""
    opt = target(optimizer)
    if opt not in _REDUCTIONS:
        _REDUCTIONS[opt] = Reduction()
    return _REDUCTIONS[opt]


def require_hook(optimizer, setting, instead):
    """Raise one sentence when this Keras's optimizer has no all-reduce hook for ``setting`` to change."""
    import keras

    if getattr(type(target(optimizer)), HOOK, None) is None:
        name = setting.partition("=")[0]
        raise RuntimeError(f"{setting} needs the Keras 3 TensorFlow optimizer's {HOOK}, "
                           f"which Keras {keras.__version__} lacks; use {name}={instead}.")


def update_hook(optimizer):
    """Wrap ``optimizer``'s hook when its ``Reduction`` asks for anything; give Keras's back when not."""
    opt = target(optimizer)
    reduction = of(opt)
    if reduction.dtype == "float32" and reduction.bucket_bytes is None:
        vars(opt).pop(HOOK, None)
        return opt
    if HOOK in vars(opt):
        return opt  # the wrapper reads the Reduction at trace time: nothing to change
    keras_sum = getattr(type(opt), HOOK).__get__(opt)

    def all_reduce_sum_gradients(grads_and_vars):
        import tensorflow as tf

        pairs = list(grads_and_vars)
        if reduction.passing:  # the step summed them before apply_gradients
            return pairs
        grads = [g for g, _ in pairs]
        if reduction.bucket_bytes is not None:
            return list(zip(sum_in_buckets(grads, reduction.bucket_bytes, reduction.dtype), [v for _, v in pairs]))
        narrow = [(tf.cast(g, tf.bfloat16) if g is not None and g.dtype == tf.float32 else g, v) for g, v in pairs]
        reduced = keras_sum(narrow)
        return [(r if g is None or r is None else tf.cast(r, g.dtype), v) for (r, v), (g, _) in zip(reduced, pairs)]

    setattr(opt, HOOK, all_reduce_sum_gradients)
    return opt


def group(sizes, bucket_bytes):
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
    set to the bucket's size). ``dtype="bfloat16"`` sums float32 gradients in bfloat16.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return list(grads)
    sizes = [_nbytes(g) for g in grads]
    out = list(grads)
    for bucket in group(sizes, bucket_bytes):
        values = [grads[i] for i in bucket]
        narrow = [tf.cast(g, tf.bfloat16) if dtype == "bfloat16" and g.dtype == tf.float32 else g for g in values]
        # A pack as large as the bucket: one collective per bucket, whatever the strategy's own bytes_per_pack.
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=sum(sizes[i] for i in bucket) + 1)
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, narrow, options=options)
        for i, g, r in zip(bucket, values, reduced):
            out[i] = tf.cast(r, g.dtype) if r.dtype != g.dtype else r
    return out


def clips(optimizer):
    """Whether ``optimizer`` clips gradients (then it must clip each replica's before they are summed)."""
    opt = target(optimizer)
    return any(getattr(opt, name, None) for name in ("clipnorm", "clipvalue", "global_clipnorm"))


@contextlib.contextmanager
def summed_already(optimizer):
    """While open, ``optimizer``'s all-reduce passes gradients through (the step summed them).

    A counter, not a thread-local: MirroredStrategy may run the optimizer's
    replica functions on other threads than the step's.
    """
    reduction = of(optimizer)
    with _passing:
        reduction.passing += 1
    try:
        yield
    finally:
        with _passing:
            reduction.passing -= 1

