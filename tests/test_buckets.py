"""tfpar.step.all_reduce buckets: gradients summed bucket by bucket (last layers first), BN statistics in one collective.

The mirrored scenarios need 2 logical CPUs, so they run once in a subprocess
(this file run as a script) that prints one JSON line; the tests assert on
it. The multi-worker scenarios run 2 real workers once (tests/mw_buckets.py,
every configuration in one cluster start-up).
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_reaped, script_result

from tfpar.step import all_reduce
from tfpar.run import driver as train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MB = 0.002  # ~2 KB buckets: the small nets below get several


# --------------------------------------------------------------------------- subprocess side

def _fit(strategy, bucket_mb, *, micro=1, jit="off", policy="float32", dtype="float32"):
    import keras
    import tensorflow as tf

    from tfpar.runtime import precision
    from tfpar.step import steps, xla

    precision.apply(policy, strategy)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 48)
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(), keras.layers.Conv2D(8, 3), keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax", dtype="float32")])
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    all_reduce.apply(model.optimizer, dtype, strategy.num_replicas_in_sync)
    xla.enable(model, jit)
    steps.accumulate(model, micro)
    in_effect = all_reduce.buckets(model, bucket_mb)
    initial = np.concatenate([w.ravel() for w in model.get_weights()])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)  # 3 steps
    history = model.fit(ds, epochs=2 if policy != "float32" else 1, verbose=0, shuffle=False)
    keras.mixed_precision.set_global_policy("float32")
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    return {"weights": weights.tolist(), "moved": float(np.abs(weights - initial).max()), "loss": history.history["loss"],
            "bucket_mb": in_effect, "own_step": "train_step" in vars(model), "xla": xla.state(model).get("train"),
            "updates": int(model.optimizer.iterations.numpy())}


def _fused_statistics(strategy):
    """BN-like ``mean`` variables assigned per variable (each its own all-reduce) and fused (tfpar.step.pieces.assign)."""
    import types

    import keras
    import tensorflow as tf

    from tfpar.step import pieces

    with strategy.scope():
        per_variable = [keras.Variable(np.zeros(n, "float32"), trainable=False, aggregation="mean") for n in (3, 5, 1)]
        fused = [keras.Variable(np.zeros(n, "float32"), trainable=False, aggregation="mean") for n in (3, 5, 1)]
    values = [np.random.default_rng(i).normal(size=(2, n)).astype("float32") for i, n in enumerate((3, 5, 1))]

    @tf.function
    def step():
        def replica_fn():
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            mine = [tf.gather(tf.constant(v), rid) for v in values]
            for variable, value in zip(per_variable, mine):
                variable.assign(value)
            pieces.assign(types.SimpleNamespace(variables=fused), {str(i): v for i, v in enumerate(mine)})

        strategy.run(replica_fn)

    step()
    copies = lambda v: [c.numpy().tolist() for c in strategy.experimental_local_results(v.value)]  # noqa: E731
    return {"per_variable": [copies(v) for v in per_variable], "fused": [copies(v) for v in fused],
            "expected": [v.mean(axis=0).tolist() for v in values]}


def _scenarios():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    mirrored = strategies.create("mirrored")
    out = {
        "keras_single_batch": _fit(mirrored, 0),
        "bucketed": _fit(mirrored, TINY_MB),
        "bucketed_default": _fit(mirrored, all_reduce.DEFAULT_BUCKET_MB),
        "bf16_single_batch": _fit(mirrored, 0, dtype="bfloat16"),
        "bf16_bucketed": _fit(mirrored, TINY_MB, dtype="bfloat16"),
        "accumulated": _fit(mirrored, 0, micro=2),
        "accumulated_bucketed": _fit(mirrored, TINY_MB, micro=2),
        "xla_bucketed": _fit(mirrored, TINY_MB, jit="on"),
        "fp16_bucketed": _fit(mirrored, TINY_MB, policy="mixed_float16"),
        "fused_statistics": _fused_statistics(mirrored),
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    _scenarios()
    sys.exit(0)


# --------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def mirrored():
    return script_result(__file__, 420)


def _same_weights(a, b):
    np.testing.assert_allclose(np.float32(a["weights"]), np.float32(b["weights"]), rtol=1e-6, atol=1e-7)


def test_plan_walks_back_from_the_last_layer_and_closes_a_bucket_at_the_flag():
    sizes = [100, 40, 400, None, 60, 10]  # layer order; None: no gradient
    assert all_reduce.plan(sizes, 50) == [[5, 4], [2], [1, 0]]
    assert all_reduce.plan(sizes, 500) == [[5, 4, 2, 1], [0]]
    assert all_reduce.plan(sizes, 0) == [[5, 4, 2, 1, 0]]  # 0: Keras's one batch
    assert all_reduce.plan(sizes, 1) == [[5], [4], [2], [1], [0]]


@pytest.mark.parametrize("bad", [-1, "25", True, float("nan")])
def test_a_bad_bucket_size_is_refused_in_one_sentence(bad):
    with pytest.raises(ValueError, match=r"^all_reduce_bucket_mb must be a number >= 0 .*, got "):
        train.TrainConfig(all_reduce_bucket_mb=bad).validate()


def test_one_replica_leaves_the_model_and_its_optimizer_alone():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    assert all_reduce.buckets(model, 25) == 0
    assert "train_step" not in vars(model) and "_all_reduce_sum_gradients" not in vars(model.optimizer)


def test_bfloat16_and_buckets_combine_in_either_order():
    import keras

    first = all_reduce.use_buckets(keras.optimizers.SGD(0.1), 4)
    all_reduce.use_bfloat16(first)
    second = all_reduce.use_bfloat16(keras.optimizers.SGD(0.1))
    hook = second._all_reduce_sum_gradients
    all_reduce.use_buckets(second, 4)
    assert second._all_reduce_sum_gradients is hook  # one wrapper per optimizer, whatever is switched on
    for opt in (first, second):
        assert all_reduce.settings(opt) == ("bfloat16", 4 * 2 ** 20)
        assert "_all_reduce_sum_gradients" in vars(opt)
    all_reduce.use_buckets(second, 0)  # back to one batch, still bfloat16
    assert all_reduce.settings(second) == ("bfloat16", None) and "_all_reduce_sum_gradients" in vars(second)
    third = all_reduce.use_buckets(keras.optimizers.SGD(0.1), 4)
    all_reduce.use_buckets(third, 0)  # float32 in one batch: Keras's own hook again
    assert all_reduce.settings(third) == ("float32", None) and "_all_reduce_sum_gradients" not in vars(third)


@pytest.mark.parametrize("name", ["bucketed", "bucketed_default"])
def test_bucketed_training_gives_keras_weights_on_two_logical_cpus(mirrored, name):
    plain, bucketed = mirrored["keras_single_batch"], mirrored[name]
    assert not plain["own_step"] and bucketed["own_step"] and bucketed["bucket_mb"] > 0
    assert plain["updates"] == bucketed["updates"] == 3 and plain["moved"] > 1e-3
    _same_weights(plain, bucketed)


@pytest.mark.parametrize("plain,bucketed", [("bf16_single_batch", "bf16_bucketed"),
                                            ("accumulated", "accumulated_bucketed"),
                                            ("keras_single_batch", "xla_bucketed")])
def test_buckets_combine_with_bfloat16_accumulation_and_xla(mirrored, plain, bucketed):
    a, b = mirrored[plain], mirrored[bucketed]
    assert a["moved"] > 1e-3
    _same_weights(a, b)
    if bucketed.startswith("xla"):
        assert b["xla"] == "xla"


def test_mixed_float16_with_buckets_trains(mirrored):
    run = mirrored["fp16_bucketed"]
    assert np.isfinite(run["weights"]).all() and run["moved"] > 1e-3
    assert run["loss"][-1] < run["loss"][0]


def test_fused_bn_statistics_equal_the_per_variable_all_reduces(mirrored):
    stats = mirrored["fused_statistics"]
    for per_variable, fused, expected in zip(stats["per_variable"], stats["fused"], stats["expected"]):
        for copy in per_variable + fused:  # every replica's copy holds the mean of the replicas' values
            np.testing.assert_allclose(copy, expected, rtol=1e-6)
        np.testing.assert_array_equal(np.float32(fused), np.float32(per_variable))


# --------------------------------------------------------------------------- 2 real workers (slow)

@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw_buckets")
    code, log, _ = run_reaped([sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "560", "--",
                               sys.executable, os.path.join(HERE, "mw_buckets.py"), str(out)], 600, merge_output=True)
    assert code == 0, log[-3000:]
    return [json.load(open(out / f"worker-{i}.json")) for i in range(2)]


@pytest.mark.slow
def test_every_configuration_agrees_across_workers(workers):
    first, second = workers
    assert first.keys() == second.keys()
    for name in first:
        assert first[name]["finite"] and first[name]["moved"] > 1e-3, name
        np.testing.assert_array_equal(np.float32(first[name]["weights"]), np.float32(second[name]["weights"]), name)


@pytest.mark.slow
@pytest.mark.parametrize("plain,bucketed", [("keras_single_batch", "bucketed"), ("keras_single_batch", "bucketed_default"),
                                            ("bf16_single_batch", "bf16_bucketed"),
                                            ("accumulated", "accumulated_bucketed"),
                                            ("keras_single_batch", "xla_bucketed"),
                                            ("accumulated", "xla_accumulated_bucketed")])
def test_bucketed_training_gives_the_same_weights_on_two_workers(workers, plain, bucketed):
    run = workers[0]
    _same_weights(run[plain], run[bucketed])
    if bucketed.startswith("xla"):
        assert run[bucketed]["xla"] == "xla"


@pytest.mark.slow
def test_one_collective_per_bucket_and_one_for_all_bn_statistics(workers):
    run = workers[0]
    plain, bucketed, default = run["keras_single_batch"], run["bucketed"], run["bucketed_default"]
    assert len(bucketed["buckets"]) > 2 and len(default["buckets"]) == 1  # the flag decides the buckets
    assert plain["bn_statistics"] == 4
    # Keras: one gradient collective and one per BN statistic; tfpar: one per bucket and one for all statistics.
    others = plain["collectives"] - 1 - plain["bn_statistics"]
    assert bucketed["collectives"] == len(bucketed["buckets"]) + 1 + others
    assert default["collectives"] == 1 + 1 + others


@pytest.mark.slow
def test_mixed_float16_with_buckets_trains_and_agrees_across_workers(workers):
    first, second = (w["fp16_bucketed"] for w in workers)
    assert first["finite"] and first["moved"] > 1e-3
    np.testing.assert_array_equal(np.float32(first["weights"]), np.float32(second["weights"]))
