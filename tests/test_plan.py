"""tfpar.step.plan and tfpar.step.builder: every step feature adds to one plan, and they compose in any order.

The mirrored scenarios need 2 logical CPUs, so they run once in a subprocess
(this file run as a script) that prints one JSON line; the tests assert on it.
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import script_result

GLOBAL = 16  # examples per step over both replicas
SHARES = [4, 12]  # uneven, each a multiple of the micro-batches
MICRO = 2
BUCKET_MB = 0.0001  # ~100 bytes: the model below gets 3 buckets
ALL = ("bfloat16", "accumulate", "buckets", "timing", "xla_off")


# --------------------------------------------------------------------------- subprocess side

def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2 * GLOBAL, 6, 6, 3)).astype("float32"), rng.integers(0, 4, 2 * GLOBAL)


def _model():
    """BN-free, so a slice's statistics cannot differ from the whole batch's."""
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-2)),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(4, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def _weights(model):
    return np.concatenate([w.ravel() for w in model.get_weights()]).tolist()


def _one_device():
    import tensorflow as tf

    model = _model()
    initial = _weights(model)
    model.fit(tf.data.Dataset.from_tensor_slices(_data()).batch(GLOBAL), epochs=1, verbose=0, shuffle=False)
    return {"weights": _weights(model), "initial": initial}


def _composed(strategy, dtype, order):
    """Every feature at once, switched on in ``order``: 2 steps of the same global batches."""
    import tensorflow as tf

    from tfpar.step import all_reduce, steps, stragglers, xla
    from tfpar.step import plan as plans

    with strategy.scope():
        model = _model()
    on = {
        "bfloat16": lambda: all_reduce.apply(model.optimizer, dtype, strategy.num_replicas_in_sync),
        "accumulate": lambda: steps.accumulate(model, MICRO),
        "buckets": lambda: all_reduce.buckets(model, BUCKET_MB),
        "timing": lambda: stragglers.enable(model, GLOBAL, balance=True, shares=SHARES),
        "xla_off": lambda: xla.enable(model, "off"),
    }
    for name in order:
        on[name]()
    dataset = tf.data.Dataset.from_tensor_slices(_data()).batch(GLOBAL)
    model.fit(stragglers.distribute(strategy, dataset), epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    plan = plans.of(model)
    sizes = [int(np.prod(w.shape)) * 4 for w in model.trainable_weights]
    return {"weights": _weights(model), "updates": int(model.optimizer.iterations.numpy()),
            "settings": list(all_reduce.settings(model.optimizer)), "micro_batches": plan.micro_batches,
            "buckets": len(all_reduce.plan(sizes, int(BUCKET_MB * 2 ** 20))),
            "examples": [row[-1] for row in plan.timing.times.numpy().tolist()]}


def _scenarios():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    mirrored = strategies.create("mirrored")
    out = {"one_device": _one_device(),
           "float32": _composed(mirrored, "float32", ALL),
           "float32_reversed": _composed(mirrored, "float32", tuple(reversed(ALL))),
           "bfloat16": _composed(mirrored, "bfloat16", ALL)}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    _scenarios()
    sys.exit(0)


# --------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def mirrored():
    return script_result(__file__, 420)


def test_the_plan_composes_and_equals_one_device_on_the_same_global_batch(mirrored):
    """Accumulation + buckets + worker timing + uneven balanced shares, float32 sums: one device's weights.

    bfloat16 sums are compared below at the tolerance their rounding implies:
    two SGD updates move the weights by up to ~2.5e-2 here, and rounding each
    summed gradient to 8 bits (~0.4%) moves them by up to ~1e-4, far above
    rtol 1e-5 of the weights (measured: 60x). float32 is where rtol 1e-5 holds
    (measured: at most 3e-8 apart).
    """
    ref, got = mirrored["one_device"], mirrored["float32"]
    assert got["updates"] == 2 and got["micro_batches"] == MICRO and got["buckets"] == 3
    assert got["settings"] == ["float32", int(BUCKET_MB * 2 ** 20)]
    assert got["examples"] == SHARES  # each replica trained on its own uneven share
    assert np.abs(np.float32(ref["weights"]) - np.float32(ref["initial"])).max() > 1e-3  # it trained
    np.testing.assert_allclose(got["weights"], ref["weights"], rtol=1e-5, atol=1e-6)


def test_the_order_features_are_switched_on_in_does_not_matter(mirrored):
    np.testing.assert_array_equal(np.float32(mirrored["float32"]["weights"]),
                                  np.float32(mirrored["float32_reversed"]["weights"]))


def test_bfloat16_sums_compose_too_within_their_rounding(mirrored):
    ref, got, f32 = (np.float64(mirrored[k]["weights"]) for k in ("one_device", "bfloat16", "float32"))
    assert mirrored["bfloat16"]["settings"][0] == "bfloat16"
    initial = np.float64(mirrored["one_device"]["initial"])
    update, error = ref - initial, np.abs(got - ref)
    assert not np.array_equal(got, f32)  # the sums really were rounded
    # Measured 2**-8 of the largest update; a wrong share or scale would be off by tens of percent.
    assert error.max() <= 2 ** -5 * np.abs(update).max()


# --------------------------------------------------------------------------- one device, no subprocess

def _compiled():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    return model


def test_features_set_plan_fields_and_any_order_gives_the_same_steps():
    from tfpar.step import steps, xla
    from tfpar.step import plan as plans

    first, second = _compiled(), _compiled()
    xla.enable(first, "on")
    steps.accumulate(first, 2)
    steps.accumulate(second, 2)
    xla.enable(second, "on")
    for model in (first, second):
        plan = plans.of(model)
        assert plan.micro_batches == 2 and plan.xla == {"train": "xla", "test": "xla", "predict": "xla"}
        assert plan.installed == {"train", "test", "predict"}
        assert {"train_step", "test_step", "predict_step"} <= set(vars(model))


def test_a_plan_that_asks_for_nothing_gives_back_keras_own_steps():
    from tfpar.step import steps, xla
    from tfpar.step import plan as plans

    model = _compiled()
    xla.enable(model, "on")
    steps.accumulate(model, 2)
    xla.enable(model, "off")
    assert set(vars(model)) & {"test_step", "predict_step"} == set() and "train_step" in vars(model)
    steps.accumulate(model, 1)
    assert set(vars(model)) & {"train_step", "test_step", "predict_step"} == set()
    assert plans.of(model).installed == set()


def test_accumulation_refuses_shares_it_cannot_split():
    import types

    from tfpar.step import steps
    from tfpar.step import plan as plans
    from tfpar.step.timing import check_shares

    with pytest.raises(ValueError, match=r"each replica's share must be a multiple of 2, got \[5, 11\]"):
        check_shares([5, 11], 2, 16, 2)
    check_shares([4, 12], 2, 16, 2)
    model = _compiled()
    shares = types.SimpleNamespace(numpy=lambda: np.array([5, 11]))
    plans.of(model).timing = types.SimpleNamespace(balance=True, shares=shares, replicas=2, global_batch=16)
    with pytest.raises(ValueError, match="multiple of 2"):
        steps.accumulate(model, 2)


def test_rebalanced_shares_stay_multiples_of_the_micro_batches():
    import types

    from tfpar.step import steps, stragglers

    model = _compiled()
    steps.accumulate(model, 3)
    callback = stragglers.WorkerTimes(types.SimpleNamespace(balance=True, global_batch=24), ["a", "b"])
    callback.set_model(model)
    shares = stragglers.shares_for([2.0, 1.0], 24, 3, multiple=callback._multiple())
    assert sum(shares) == 24 and all(share % 3 == 0 for share in shares), shares
