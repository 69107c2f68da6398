"""tfpar.step.stragglers: every replica's times, the straggler warning, and batches balanced by speed.

The share rule is a pure function (fast). The mirrored scenarios need 2
logical CPUs, so they run once in a subprocess (this file run as a script)
that prints one JSON line. The multi-worker ones run 2 real workers through
tfpar-launch (slow). The slow replica is injected with the test-only seam
``TFPAR_TEST_SLOW_REPLICA=REPLICA:MS_PER_EXAMPLE`` (a sleep in that replica's
step, per example of its slice).
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import event_scalars, quiet_env, run_reaped, script_result, tfpar_train_command

HERE = os.path.dirname(os.path.abspath(__file__))
GLOBAL = 16
UNEQUAL = [5, 11]


# --------------------------------------------------------------------------- subprocess side

def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3 * GLOBAL, 6, 6, 3)).astype("float32"), rng.integers(0, 4, 3 * GLOBAL)


def _model():
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-2)),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.2, momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _embedding_model():
    """Integer inputs through an Embedding: its gradient is sparse (``IndexedSlices``)."""
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(12, 3), keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


def _embedding_data():
    rng = np.random.default_rng(1)
    return rng.integers(0, 12, (3 * GLOBAL, 5)).astype("int32"), rng.integers(0, 4, 3 * GLOBAL)


def _weights(model):
    return np.concatenate([w.ravel() for w in model.get_weights()]).tolist()


def reference():
    """One device, the same 3 global batches: the update the balanced run must equal."""
    import tensorflow as tf

    model = _model()
    x, y = _data()
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL), epochs=1, verbose=0, shuffle=False)
    return {"weights": _weights(model), "loss": history.history["loss"], "accuracy": history.history["accuracy"]}


def embedding_reference():
    import tensorflow as tf

    model = _embedding_model()
    model.fit(tf.data.Dataset.from_tensor_slices(_embedding_data()).batch(GLOBAL), epochs=1, verbose=0, shuffle=False)
    return {"weights": _weights(model)}


def balanced(strategy, shares, callbacks=(), steps=None, batch=GLOBAL, make=_model, data=_data):
    import tensorflow as tf

    from tfpar.step import all_reduce, stragglers

    with strategy.scope():
        model = make()
    all_reduce.buckets(model, 0.001)  # tfpar's bucketed sums, as tfpar-train uses by default
    state = stragglers.enable(model, batch, balance=True, shares=shares)
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.repeat().batch(batch) if steps else ds.batch(batch)
    history = model.fit(stragglers.distribute(strategy, ds), epochs=1, steps_per_epoch=steps or 3, verbose=0,
                        shuffle=False, callbacks=[cb(state) for cb in callbacks])
    return model, state, history


def timed(strategy, slow, every=3, balance=False, steps=14, batch=GLOBAL, names=("replica 0", "replica 1"),
          print_fn=None):
    from tfpar.step import stragglers

    os.environ.pop(stragglers.SLOW_ENV, None)
    if slow:
        os.environ[stragglers.SLOW_ENV] = slow
    made = []

    def callback(state):
        made.append(stragglers.WorkerTimes(state, names, every=every,
                                           minimum=stragglers.minimum_share(batch, 2, 0.25), print_fn=print_fn))
        return made[0]

    if balance:
        balanced(strategy, None, callbacks=[callback], steps=steps, batch=batch)
    else:
        import tensorflow as tf

        from tfpar.step import all_reduce

        with strategy.scope():
            model = _model()
        all_reduce.buckets(model, 0.001)
        state = stragglers.enable(model, batch)
        x, y = _data()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch)
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[callback(state)])
    os.environ.pop(stragglers.SLOW_ENV, None)
    return made[0].report() | {"history": made[0].history}


def _scenarios():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    mirrored = strategies.create("mirrored")
    out = {"reference": reference()}
    model, _, history = balanced(mirrored, UNEQUAL)
    out["balanced"] = {"weights": _weights(model), "loss": history.history["loss"],
                       "accuracy": history.history["accuracy"]}
    model, _, _ = balanced(mirrored, UNEQUAL, make=_embedding_model, data=_embedding_data)
    out["embedding"] = {"weights": _weights(model), "reference": embedding_reference()["weights"]}
    out["even"] = timed(mirrored, "*:2")  # both replicas busy alike (2 ms per example)
    out["slow"] = timed(mirrored, "1:4")
    out["rebalanced"] = timed(mirrored, "1:4", every=2, balance=True, steps=16, batch=32)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    _scenarios()
    sys.exit(0)


# --------------------------------------------------------------------------- test side

from tfpar.step import stragglers  # noqa: E402
from tfpar.run import driver as train


def test_shares_follow_speed_sum_to_the_batch_and_respect_the_minimum():
    assert stragglers.shares_for([1.0, 1.0], 16) == [8, 8]
    assert stragglers.shares_for([3.0, 1.0], 16) == [12, 4]
    assert stragglers.shares_for([2.0, 1.0], 16) == [11, 5]  # 10.67, 5.33: largest remainder
    assert stragglers.shares_for([100.0, 1.0], 16, minimum=4) == [12, 4]
    assert stragglers.shares_for([100.0, 1.0, 1.0], 30, minimum=3) == [24, 3, 3]
    assert stragglers.shares_for([0.0, float("nan")], 8) == [4, 4]  # nothing measured: even
    with pytest.raises(ValueError, match="cannot give 2 replicas at least 9"):
        stragglers.shares_for([1.0, 1.0], 16, minimum=9)
    assert stragglers.minimum_share(64, 2, 0.25) == 8 and stragglers.minimum_share(2, 2, 0.25) == 1
    assert stragglers.shares_for([2.0, 1.0], 16, multiple=2) == [10, 6]  # 5.33, 2.67 units of 2
    assert stragglers.shares_for([100.0, 1.0], 16, minimum=3, multiple=2) == [12, 4]  # the minimum rounded up
    assert stragglers.shares_for([2.0, 1.0], 15, multiple=2) == [10, 5]  # 2 does not divide 15: any count


@pytest.mark.parametrize("slowdown", [1.5, 3.0, 40.0])
def test_shares_converge_for_a_steady_slowdown_and_never_drop_below_the_minimum(slowdown):
    """A replica's compute time: a fixed 5 ms plus its examples times its cost (one replica `slowdown` x)."""
    cost, batch, minimum = [1.0, slowdown], 64, 8
    shares, seen = stragglers.even_shares(batch, 2), []
    for _ in range(12):
        times = [5.0 + c * n for c, n in zip(cost, shares)]
        shares = stragglers.shares_for([n / t for n, t in zip(shares, times)], batch, minimum)
        seen.append(shares)
    assert all(min(s) >= minimum and sum(s) == batch for s in seen)
    assert seen[-1] == seen[-2] == seen[-3]  # settled
    times = [5.0 + c * n for c, n in zip(cost, seen[-1])]
    if seen[-1][1] > minimum:  # not held at the minimum: the times are equal to within one example
        assert abs(times[0] - times[1]) <= max(cost)
    else:
        assert slowdown == 40.0 and times[1] > times[0]


@pytest.mark.parametrize("field,value,match", [
    ("balance_every", 0, "balance_every must be a positive number of steps"),
    ("balance_min_fraction", 0.0, r"balance_min_fraction must be in \(0, 1\]"),
])
def test_bad_balance_settings_are_one_sentence(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("options,match", [
    (dict(strategy="one_device"), "balance_batches works with strategy mirrored or multi_worker"),
    (dict(strategy="mirrored", jit_compile="on"), "balance_batches needs jit_compile=auto or off"),
])
def test_balance_batches_refuses_what_it_cannot_balance(options, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(balance_batches=True, **options).validate()


def test_balance_batches_take_micro_batches():
    """The step plan slices each replica's share into its micro-batches (tests/test_plan.py checks the numbers)."""
    config = train.TrainConfig(strategy="mirrored", balance_batches=True, grad_accum_steps=2).validate()
    assert config.balance_batches and config.grad_accum_steps == 2


@pytest.fixture(scope="module")
def mirrored():
    return script_result(__file__, 600)


def test_unequal_shares_on_two_logical_cpus_give_one_global_batchs_update(mirrored):
    ref, got = mirrored["reference"], mirrored["balanced"]
    assert np.abs(np.float32(ref["weights"]) - np.float32(_initial_weights())).max() > 1e-3  # it trained
    np.testing.assert_allclose(got["weights"], ref["weights"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], ref["accuracy"], rtol=1e-6)


def test_sparse_embedding_gradients_are_balanced_too(mirrored):
    got, ref = mirrored["embedding"]["weights"], mirrored["embedding"]["reference"]
    assert np.abs(np.float32(ref) - np.float32(_weights(_embedding_model()))).max() > 1e-3  # it trained
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _initial_weights():
    import keras  # noqa: F401  (the model is built in this process only for its initial weights)

    return _weights(_model())


def test_the_warning_names_a_slow_replica_and_not_an_even_pair(mirrored):
    assert mirrored["even"]["straggler_warning"] is None, mirrored["even"]["workers"]
    warning = mirrored["slow"]["straggler_warning"]
    assert warning and "replica 1" in warning and "compute dominates" in warning, warning
    slow = mirrored["slow"]["workers"]
    assert slow[1]["compute_ms"] > slow[0]["compute_ms"] + 0.5 * 4 * GLOBAL / 2  # the injected 4 ms per example
    assert slow[0]["collective_wait_ms"] > slow[1]["collective_wait_ms"]  # the fast one waits for the slow one
    assert all(w["examples_per_step"] == GLOBAL / 2 for w in slow)


def test_a_real_run_moves_shares_to_the_fast_replica_and_keeps_the_minimum(mirrored):
    run = mirrored["rebalanced"]
    history = [shares for _, shares in run["shares_history"]]
    assert history[0] == [16, 16] and all(sum(s) == 32 and min(s) >= 4 for s in history)  # minimum: 16 / 4
    assert run["shares"][0] > run["shares"][1] >= 4, history


@pytest.mark.slow
def test_two_real_workers_unequal_shares_equal_one_global_batch_and_the_warning_fires(tmp_path):
    code, out, _ = run_reaped([sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--", sys.executable,
                               os.path.join(HERE, "mw_stragglers.py"), str(tmp_path)], 600, env=quiet_env(),
                              merge_output=True)
    assert code == 0, out[-3000:]
    chief, other = (json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2))
    for result in (chief, other):
        assert np.abs(np.float32(result["reference"]) - np.float32(result["initial"])).max() > 1e-3
        np.testing.assert_allclose(result["balanced"], result["reference"], rtol=1e-5, atol=1e-6)
    assert chief["even_warning"] is None
    assert chief["slow_warning"] and "worker 1" in chief["slow_warning"], chief["slow_workers"]
    assert "straggler: worker 1" in out and out.count("straggler:") == 1  # the chief's one line


@pytest.mark.slow
def test_tfpar_train_balances_two_real_workers(tmp_path):
    """tfpar-train --balance_batches on 2 workers, worker 1 slowed: equal weights, shares moved, summary, TensorBoard."""
    env = quiet_env(**{stragglers.SLOW_ENV: "1:3"})
    command = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--"] + tfpar_train_command() + [
        "--strategy=multi_worker", "--model=resnet18", "--width_multiplier=0.125", "--image_size=32",
        "--data=digits", "--batch_size=32", "--epochs=1", "--steps_per_epoch=16", "--validation_steps=0",
        "--balance_batches", "--balance_every=3", "--checkpoint_best=false", "--backup_freq=none",
        f"--model_dir={tmp_path}"]
    code, out, _ = run_reaped(command, 600, env=env, merge_output=True)
    assert code == 0, out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    worker = json.loads((tmp_path / "summary.worker-1.json").read_text())
    assert summary["weights_sha256"] == worker["weights_sha256"]
    times = summary["worker_times"]
    assert [w["name"] for w in times["workers"]] == ["worker 0", "worker 1"]
    assert times["shares"][0] > times["shares"][1] >= 4 and sum(times["shares"]) == 32, times["shares_history"]
    assert worker["worker_times"]["shares_history"] == times["shares_history"]  # every worker decided the same
    for name in ("worker_0", "worker_1"):
        scalars = event_scalars(str(tmp_path / "workers_timing" / name))
        assert len(scalars["workers/compute_ms"]) >= 3 and "workers/collective_wait_ms" in scalars
