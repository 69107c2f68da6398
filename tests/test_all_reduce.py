"""tfpar.step.all_reduce: gradients summed between replicas in bfloat16.

The mirrored scenarios need 2 logical CPUs, so they run once in a subprocess
(this file run as a script) that prints one JSON line; the tests assert on it.
Real multi-worker training with --all_reduce_dtype=bfloat16 is in
test_multi_worker.py.
"""

import json
import os
import sys
import types

import numpy as np
import pytest

from helpers import script_result

from tfpar.step import all_reduce
from tfpar.run import driver as train



# --------------------------------------------------------------------------- subprocess side

def _one_update(strategy, per_replica_grads, dtype):
    """SGD(lr=1) from zeros with each replica's own gradient: the variable ends at -(the sum Keras made)."""
    import keras
    import tensorflow as tf

    with strategy.scope():
        var = keras.Variable(np.zeros(len(per_replica_grads[0]), "float32"))
        unused = keras.Variable(np.zeros(1, "float32"))  # a None gradient must pass through untouched
        opt = keras.optimizers.SGD(1.0)
        opt.build([var, unused])
    all_reduce.apply(opt, dtype, strategy.num_replicas_in_sync)

    @tf.function
    def step():
        def replica_fn():
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            grad = tf.gather(tf.constant(per_replica_grads, tf.float32), rid)
            opt.apply([grad, None], [var, unused])

        strategy.run(replica_fn)

    step()
    return (-np.asarray(var.numpy())).tolist(), np.asarray(unused.numpy()).tolist()


def _fit(strategy, dtype, steps=6):
    """A small dense model's losses and final weights after ``steps`` fit steps."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    with strategy.scope():
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    all_reduce.apply(model.optimizer, dtype, strategy.num_replicas_in_sync)
    history = model.fit(x, y, batch_size=16, epochs=steps, steps_per_epoch=1, shuffle=False, verbose=0)
    return history.history["loss"], np.concatenate([w.ravel() for w in model.get_weights()]).tolist()


def _scenarios():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    import tensorflow as tf

    strategy = strategies.create("mirrored")
    # Values bfloat16 cannot hold (8-bit mantissa): the sums differ from float32's.
    grads = [[1.0 + 3 * 2.0 ** -9, 0.1, -7.3], [2.0 ** -6, 0.2, 1e-3]]
    as_bf16 = [tf.cast(tf.constant(g, tf.float32), tf.bfloat16) for g in grads]
    out = {
        "sum_float32": _one_update(strategy, grads, "float32"),
        "sum_bfloat16": _one_update(strategy, grads, "bfloat16"),
        "expected_bfloat16": tf.cast(as_bf16[0] + as_bf16[1], tf.float32).numpy().tolist(),
        "expected_float32": (np.float32(grads[0]) + np.float32(grads[1])).tolist(),
        "fit_float32": _fit(strategy, "float32"),
        "fit_bfloat16": _fit(strategy, "bfloat16"),
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    _scenarios()
    sys.exit(0)


# --------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def mirrored():
    return script_result(__file__, 300)


def test_gradients_are_summed_in_bfloat16_between_replicas(mirrored):
    summed, untouched = mirrored["sum_bfloat16"]
    np.testing.assert_array_equal(np.float32(summed), np.float32(mirrored["expected_bfloat16"]))
    assert untouched == [0.0]  # a variable without gradient is left alone
    assert not np.array_equal(np.float32(mirrored["expected_bfloat16"]), np.float32(mirrored["expected_float32"]))


def test_float32_leaves_keras_summing_in_float32(mirrored):
    summed, _ = mirrored["sum_float32"]
    np.testing.assert_array_equal(np.float32(summed), np.float32(mirrored["expected_float32"]))


def test_fit_with_bfloat16_all_reduce_trains_close_to_float32(mirrored):
    losses32, weights32 = mirrored["fit_float32"]
    losses16, weights16 = mirrored["fit_bfloat16"]
    assert losses16[-1] < losses16[0]
    np.testing.assert_allclose(losses16, losses32, rtol=1e-2)
    diff = np.abs(np.float32(weights16) - np.float32(weights32)).max()
    assert 0 < diff < 1e-2  # rounded sums: close to float32, not the same run


def test_a_loss_scale_optimizer_has_its_inner_optimizer_wrapped():
    import keras

    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    target = all_reduce.use_bfloat16(lso)
    assert target is lso.inner_optimizer
    hook = lso.inner_optimizer._all_reduce_sum_gradients
    assert "_all_reduce_sum_gradients" in vars(lso.inner_optimizer) and "_all_reduce_sum_gradients" not in vars(lso)
    assert all_reduce.settings(lso) == all_reduce.settings(lso.inner_optimizer) == ("bfloat16", None)
    assert all_reduce.use_bfloat16(lso) is target and lso.inner_optimizer._all_reduce_sum_gradients is hook  # once


def test_one_replica_keeps_float32_and_leaves_the_optimizer_alone():
    import keras

    opt = keras.optimizers.SGD(0.1)
    assert all_reduce.apply(opt, "bfloat16", replicas=1) == "float32"
    assert "_all_reduce_sum_gradients" not in vars(opt)


def test_a_keras_without_the_hook_fails_in_one_sentence():
    with pytest.raises(RuntimeError, match=r"lacks; use all_reduce_dtype=float32\.$"):
        all_reduce.use_bfloat16(types.SimpleNamespace())


@pytest.mark.parametrize("fields,match", [
    ({"all_reduce_dtype": "float16"}, r"all_reduce_dtype must be one of: float32, bfloat16; got 'float16'\."),
    ({"all_reduce_dtype": "bfloat16", "strategy": "parameter_server"}, r"parameter_server does not all-reduce"),
    ({"all_reduce_dtype": "bfloat16", "strategy": "dtensor", "mesh": "batch=2"}, r"dtensor does not all-reduce"),
])
def test_bad_all_reduce_dtype_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**fields).validate()
