"""tfpar.step.steps: gradient accumulation over micro-batches under tf.distribute strategies.

The mirrored scenarios need 2 logical CPUs, so they run once in a subprocess
(this file run as a script) that prints one JSON line; the tests assert on it.
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import script_result



# --------------------------------------------------------------------------- subprocess side

def _fit(keras, strategy, micro_batches, *, bn=False, jit="off", epochs=1, batch=16):
    """A small conv net fitted on 64 fixed examples; returns its weights and logs."""
    import tensorflow as tf

    from tfpar.step import steps, xla

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    keras.utils.set_random_seed(1)
    with strategy.scope():
        layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-3))]
        layers += [keras.layers.BatchNormalization(momentum=0.5)] if bn else []
        layers += [keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    xla.enable(model, jit)
    steps.accumulate(model, micro_batches)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    initial = [w.tolist() for w in model.get_weights()]
    history = model.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    return {"weights": [w.tolist() for w in model.get_weights()], "initial": initial, "loss": history.history["loss"],
            "accuracy": history.history["accuracy"], "updates": int(model.optimizer.iterations.numpy()),
            "replicas": strategy.num_replicas_in_sync}


def _scenarios():
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    import keras

    mirrored = strategies.create("mirrored")
    return {
        "plain": _fit(keras, mirrored, 1),
        "accumulated": _fit(keras, mirrored, 4),  # 8 examples per replica -> 4 micro-batches of 2
        "accumulated_xla": _fit(keras, mirrored, 2, jit="on"),
        "bn_accumulated": _fit(keras, mirrored, 2, bn=True, epochs=4),
    }


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print("RESULT " + json.dumps(_scenarios()), flush=True)
    sys.exit(0)


# --------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def mirrored():
    return script_result(__file__, 300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a["weights"], b["weights"]))


def test_accumulated_micro_batches_make_the_same_update_as_the_whole_batch(mirrored):
    """4 micro-batches per replica, one all-reduce: the weights of an ordinary step on the same batch."""
    plain, accumulated = mirrored["plain"], mirrored["accumulated"]
    assert plain["replicas"] == accumulated["replicas"] == 2
    assert accumulated["updates"] == plain["updates"] == 4  # one optimizer update per step, not per micro-batch
    assert _max_diff(plain, accumulated) < 1e-5
    np.testing.assert_allclose(accumulated["loss"], plain["loss"], rtol=1e-5)
    assert accumulated["accuracy"] == plain["accuracy"]
    assert plain["weights"] != mirrored["bn_accumulated"]["weights"]  # the comparison can tell weights apart
    # Training moved the weights, so matching the ordinary step is not a match of two untouched models.
    assert _max_diff(accumulated, {"weights": accumulated["initial"]}) > 1e-2


def test_accumulation_composes_with_per_replica_xla(mirrored):
    assert mirrored["accumulated_xla"]["updates"] == 4
    assert _max_diff(mirrored["plain"], mirrored["accumulated_xla"]) < 1e-4


def test_accumulation_with_batch_normalization_trains(mirrored):
    run = mirrored["bn_accumulated"]
    assert run["updates"] == 16 and all(np.isfinite(run["loss"]))
    assert run["loss"][-1] < run["loss"][0]


def _compiled(keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    return model


def test_micro_batches_must_divide_the_batch():
    import keras

    from tfpar.step import steps

    model = _compiled(keras)
    steps.accumulate(model, 3)
    with pytest.raises(ValueError, match="A per-replica batch of 8 does not split into 3 equal micro-batches"):
        model.fit(np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32"), batch_size=8, verbose=0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_micro_batches_must_be_a_positive_integer(bad):
    import keras

    from tfpar.step import steps

    with pytest.raises(ValueError, match="micro_batches must be a positive integer"):
        steps.accumulate(_compiled(keras), bad)


def test_a_model_with_its_own_train_step_is_refused():
    import keras

    from tfpar.step import steps

    class Custom(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model = Custom([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="defines its own train_step"):
        steps.accumulate(model, 2)
    steps.accumulate(model, 1)  # nothing to split: allowed


def test_one_micro_batch_gives_back_keras_own_step():
    import keras

    from tfpar.step import steps

    model = _compiled(keras)
    steps.accumulate(model, 2)
    assert "train_step" in model.__dict__
    steps.accumulate(model, 1)
    assert "train_step" not in model.__dict__ and steps.micro_batches(model) == 1


def test_moving_statistics_follow_every_micro_batch_in_order():
    """One step of 2 micro-batches leaves BN's moving statistics where 2 training calls on the halves would."""
    import keras

    from tfpar.step import steps

    x = np.random.default_rng(3).normal(2.0, 3.0, size=(16, 5)).astype("float32")
    y = np.zeros((16, 1), "float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization(momentum=0.5), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    steps.accumulate(model, 2)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    reference = keras.layers.BatchNormalization(momentum=0.5)
    reference(x[:8], training=True)
    reference(x[8:], training=True)
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-5)
    assert not np.allclose(bn.moving_mean.numpy(), 0.5 * x[8:].mean(axis=0))  # not just the last micro-batch
