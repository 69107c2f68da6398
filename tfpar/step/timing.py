"""Worker timing inside the step: clock stamps per replica, the test-only slowdown, balanced slices.

The train step times each replica with ``tf.timestamp()`` ops chained to its
data and gradients, and with balanced shares trains each replica on its slice
of the global batch, its gradients scaled to the global batch's mean. Why and
how it is reported: ``tfpar.step.stragglers``.
"""

import os
import time

import tensorflow as tf

SLOW_ENV = "TFPAR_TEST_SLOW_REPLICA"  # test-only seam: "REPLICA:MS_PER_EXAMPLE" ("*" every replica) sleeps in a step
COLUMNS = ("input_ms", "compute_ms", "collective_wait_ms", "examples")


class Timing:
    """What the timed step and ``stragglers.WorkerTimes`` share (plain Python: not tracked, not checkpointed).

    ``shares``: each replica's slice of the global batch when ``balance``;
    ``times``: the last step's row per replica (``COLUMNS``), gathered on every worker.
    """

    def __init__(self, strategy, replicas, global_batch, balance, shares, slow):
        self.replicas, self.global_batch, self.balance, self.slow = replicas, global_batch, balance, slow
        with tf.init_scope(), strategy.scope():
            self.clock = tf.Variable(0.0, trainable=False)  # one copy per replica: orders only its own stamps
        with tf.init_scope():
            self.host_begin = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self.times = tf.Variable(tf.zeros((replicas, len(COLUMNS)), tf.float32), trainable=False)
            self.shares = tf.Variable(shares, dtype=tf.int32, trainable=False)


def slow_seam():
    """``(replica, ms per example)`` from ``TFPAR_TEST_SLOW_REPLICA``: a test-only slowdown, or None."""
    value = os.environ.get(SLOW_ENV, "")
    if not value:
        return None
    replica, _, ms = value.partition(":")
    return (-1 if replica == "*" else int(replica)), float(ms)


def _sleep(ms):
    time.sleep(float(ms) / 1000.0)
    return 0.0


# The clock reads and the test seam's sleep are functions taking the replica's own copy of a variable.
# Inside a tf.function, TensorFlow orders every stateful op with no resource input (tf.timestamp,
# py_function) in one chain in program order, across replicas too: under MirroredStrategy replica 1's
# first stamp would wait for replica 0's stamps and sleeps. A call with a resource input is ordered
# only with the other users of that resource: here, the same replica's stamps.
@tf.function(autograph=False)
def stamp(handle):
    del handle
    return tf.timestamp()


@tf.function(autograph=False)
def nap(handle, ms):
    del handle
    return tf.ensure_shape(tf.py_function(_sleep, [ms], tf.float32), [])  # a known shape: gradients stay packable


def scaled(grad, factor):
    """``grad * factor``, for dense gradients and for the sparse ones of embeddings (``IndexedSlices``)."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * tf.cast(factor, grad.dtype), grad.indices, grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


def slice_of(timing, replica, batch):
    """This replica's slice ``[start, start + share)`` of the global ``batch`` (shares read each step: no retracing)."""
    shares = timing.shares.read_value()
    start, size = tf.reduce_sum(shares[:replica]), shares[replica]
    return tf.nest.map_structure(lambda t: None if t is None else t[start:start + size], batch)


def check_shares(shares, replicas, global_batch, micro_batches=1):
    """Raise one sentence unless ``shares`` are ``replicas`` positive counts summing to ``global_batch``,
    each a multiple of ``micro_batches``."""
    if len(shares) != replicas or sum(shares) != global_batch or min(shares) < 1:
        raise ValueError(f"shares must be {replicas} positive counts summing to the global batch {global_batch}, "
                         f"got {shares}.")
    if any(share % micro_batches for share in shares):
        raise ValueError(f"With {micro_batches} micro-batches each replica's share must be a multiple of "
                         f"{micro_batches}, got {shares}.")
