"""tfpar.step.xla: XLA-compiled per-replica steps under tf.distribute strategies.

The mirrored scenarios need 2 logical CPUs, so they run once in a subprocess
(this file run as a script) that prints one JSON line; the tests assert on it.
XLA compiles slowly on this CPU, hence tiny models and few steps.
"""

import json
import os
import sys
import warnings

import numpy as np
import pytest

from helpers import run_reaped

HERE = os.path.dirname(os.path.abspath(__file__))

# Tolerance for "the same run with and without XLA": XLA fuses and reorders
# float32 arithmetic, so values agree to about 1e-6 relative; 1e-4 is ample
# and still far below any change a wrong gradient or skipped step would make.
RTOL, ATOL = 1e-4, 1e-5


# --------------------------------------------------------------------------- subprocess side

def _data(n=36):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 10, n)


def _build(keras, extra_layer=None):
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
              keras.layers.ReLU(), keras.layers.Flatten()]
    if extra_layer is not None:
        layers.append(extra_layer)
    layers.append(keras.layers.Dense(10, dtype="float32"))
    return keras.Sequential(layers)


class _Record:
    """A Keras callback factory that records per-step logs, scale and weights."""

    @staticmethod
    def make(keras):
        class Record(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.losses, self.scales, self.kernels = [], [], []

            def on_train_batch_end(self, batch, logs=None):
                self.losses.append(float(logs["loss"]))
                scale = getattr(self.model.optimizer, "dynamic_scale", None)
                self.scales.append(None if scale is None else float(np.asarray(scale)))
                self.kernels.append(np.asarray(self.model.layers[-1].kernel).ravel()[:8].tolist())

        return Record()


def _fit(keras, strategy, jit, initial, *, policy="float32", optimizer=None, extra_layer=None, batch=8, n=36):
    from tfpar.step import xla

    keras.mixed_precision.set_global_policy(policy)
    x, y = _data(n)
    with strategy.scope():
        model = _build(keras, extra_layer)
        if initial is not None:
            model.set_weights(initial)
        model.compile(optimizer or keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = xla.enable(model, jit)
        record = _Record.make(keras)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        evaluated = model.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)
        predicted = model.predict(x[:10], batch_size=batch, verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    return {
        "resolved": resolved, "state": xla.state(model), "losses": record.losses, "scales": record.scales,
        "kernels": record.kernels, "eval_loss": float(evaluated["loss"]),
        "predicted": np.asarray(predicted, dtype="float32").tolist(),
        "weights": [np.asarray(w, dtype="float64").ravel().tolist() for w in model.get_weights()],
        "warnings": [str(w.message) for w in caught if "XLA" in str(w.message)],
    }


def _scenarios():
    """Everything that needs 2 logical CPUs, in one process (TF start-up is slow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfpar.runtime import strategies

    strategies.configure_virtual_cpus(2)
    import keras
    import tensorflow as tf

    from tfpar.step import xla

    strategy = strategies.create("mirrored")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        initial = _build(keras).get_weights()
    out = {"auto_on_cpu": xla.resolve("auto", strategy)}
    # 36 examples in batches of 8: four full steps and a partial last one (4).
    out["off"] = _fit(keras, strategy, "off", initial)
    out["on"] = _fit(keras, strategy, "on", initial)

    # Upstream: Keras's own jit_compile=True under MirroredStrategy.
    x, y = _data(16)
    with strategy.scope():
        model = _build(keras)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        out["upstream"] = "trained"
    except Exception as err:  # noqa: BLE001 - reported verbatim
        out["upstream"] = str(err)[:2000]

    # mixed_float16 with a loss scale so large that the first steps overflow.
    def lso():
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**30)

    out["fp16_off"] = _fit(keras, strategy, "off", initial, policy="mixed_float16", optimizer=lso())
    out["fp16_on"] = _fit(keras, strategy, "on", initial, policy="mixed_float16", optimizer=lso())

    # A layer XLA cannot compile (a host-side numpy_function).
    class HostSide(keras.layers.Layer):
        def call(self, inputs):
            offset = tf.numpy_function(lambda a: a, [tf.reduce_mean(inputs)], inputs.dtype)
            return inputs + 0.0 * tf.reshape(offset, [])

    out["unsupported"] = _fit(keras, strategy, "on", None, extra_layer=HostSide(name="host_side"))

    # The driver (tfpar-train --jit_compile=on) under mirrored.
    import tempfile

    from tfpar.run import driver as train

    with tempfile.TemporaryDirectory() as model_dir:
        result = train.run(_train_config(model_dir, "mirrored", "on", virtual_cpus=2), print_fn=lambda *a: None)
    out["driver_on"] = {k: result[k] for k in ("jit_compile", "xla_steps", "train_loss", "replicas")}
    return out


def _train_config(model_dir, strategy, jit_compile, **overrides):
    from tfpar.run import driver as train

    return train.TrainConfig(model="alexnet_bn", width_multiplier=0.125, image_size=32, strategy=strategy,
                             batch_size=32, epochs=1, steps_per_epoch=2, validation_steps=1, tensorboard=False,
                             checkpoint_best=False, model_dir=model_dir, jit_compile=jit_compile, verbose=0,
                             **overrides)


def _multi_worker(out_dir):
    """One of 2 worker processes (TF_CONFIG from tfpar.launcher): jit off, then on."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from tfpar.runtime import cluster, strategies
    from tfpar.core import summary

    strategy = strategies.create("multi_worker")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        initial = _build(keras).get_weights()
    # 32 examples, global batch 8 (4 per worker): 4 steps, no partial batch.
    result = {"off": _fit(keras, strategy, "off", initial, n=32), "on": _fit(keras, strategy, "on", initial, n=32)}
    summary.write_json_atomic(os.path.join(out_dir, f"{cluster.detect().task_name}.json"), result)


# --------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def mirrored():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    code, stdout, stderr = run_reaped([sys.executable, os.path.abspath(__file__)], 540, env=env)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert code == 0 and lines, f"scenario process failed:\n{stderr[-4000:]}"
    return json.loads(lines[-1])


def _close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64"), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_mirrored_jit_matches_uncompiled_step_by_step(mirrored):
    off, on = mirrored["off"], mirrored["on"]
    assert on["resolved"] is True and off["resolved"] is False
    assert on["state"] == {"train": "xla", "test": "xla", "predict": "xla"}, on["state"]
    assert on["warnings"] == []
    assert len(on["losses"]) == len(off["losses"]) == 5  # 4 full batches + the partial one
    _close(on["losses"], off["losses"])
    _close(on["kernels"], off["kernels"])
    for a, b in zip(on["weights"], off["weights"]):
        _close(a, b, atol=1e-4)
    _close(on["eval_loss"], off["eval_loss"])
    _close(on["predicted"], off["predicted"], atol=1e-4)
    # The weights moved: training happened, not a no-op in both runs.
    assert not np.allclose(on["kernels"][0], on["kernels"][-1])


@pytest.mark.slow
def test_upstream_keras_jit_under_mirrored_still_fails(mirrored):
    # When this fails, Keras compiles per replica itself and tfpar.step.xla can go.
    assert "Trying to access resource" in mirrored["upstream"], mirrored["upstream"][:500]


@pytest.mark.slow
def test_mixed_float16_overflow_skips_step_and_drops_scale_as_without_xla(mirrored):
    off, on = mirrored["fp16_off"], mirrored["fp16_on"]
    assert on["state"]["train"] == "xla"
    # The first step overflows: the scale halves and the weights do not move.
    assert on["scales"][0] == 2.0**29
    initial_kernel = off["kernels"][0]
    assert on["kernels"][0] == initial_kernel
    assert on["scales"] == off["scales"]
    _close(on["kernels"], off["kernels"], rtol=1e-3, atol=1e-3)  # float16 forward pass
    _close(on["losses"], off["losses"], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_uncompilable_layer_falls_back_with_one_warning_naming_it(mirrored):
    run = mirrored["unsupported"]
    assert run["state"] == {"train": "fallback", "test": "fallback", "predict": "fallback"}
    assert len(run["warnings"]) == 1, run["warnings"]  # one warning for all three steps
    assert "layer 'host_side'" in run["warnings"][0] and "PyFunc" in run["warnings"][0]
    assert len(run["losses"]) == 5 and all(np.isfinite(run["losses"]))


@pytest.mark.slow
def test_auto_is_off_on_cpu_under_mirrored(mirrored):
    assert mirrored["auto_on_cpu"] is False


@pytest.mark.slow
def test_driver_with_jit_on_under_mirrored_records_xla_steps(mirrored):
    run = mirrored["driver_on"]
    assert run["replicas"] == 2 and run["jit_compile"] is True
    assert run["xla_steps"] == {"train": "xla", "test": "xla", "predict": "xla"}
    assert np.isfinite(run["train_loss"])


def test_driver_auto_records_jit_off_on_cpu(tmp_path):
    from tfpar.run import driver as train

    result = train.run(_train_config(str(tmp_path), "one_device", "auto"), print_fn=lambda *a: None)
    assert result["jit_compile"] is False and result["xla_steps"] == {}
    assert json.loads((tmp_path / "summary.json").read_text())["jit_compile"] is False


def test_resolve_modes():
    from tfpar.step import xla

    assert xla.resolve("on") is True and xla.resolve("off") is False
    assert xla.resolve(True) is True
    import tensorflow as tf

    assert xla.resolve("auto") is False  # this test machine has no GPU or TPU
    assert xla.resolve("auto", tf.distribute.get_strategy()) is False  # the default strategy
    with pytest.raises(ValueError, match="jit_compile"):
        xla.resolve("yes")


def test_enable_needs_compiled_model_and_off_leaves_keras_alone():
    import keras

    from tfpar.step import xla

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="compile"):
        xla.enable(model)
    model.compile("sgd", "mse")
    assert xla.enable(model, "on") is True and "train_step" in model.__dict__
    assert xla.enable(model, "off") is False
    assert "train_step" not in model.__dict__ and model.jit_compile is False


@pytest.mark.slow
def test_multi_worker_jit_matches_uncompiled_and_workers_agree(tmp_path):
    launch = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "500", "--",
              sys.executable, os.path.abspath(__file__), "multi_worker", str(tmp_path)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    code, out, _ = run_reaped(launch, 540, env=env, merge_output=True)
    assert code == 0, out[-4000:]
    workers = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    for worker in workers:
        on, off = worker["on"], worker["off"]
        assert on["state"] == {"train": "xla", "test": "xla", "predict": "xla"}, on["state"]
        assert len(on["losses"]) == len(off["losses"]) == 4
        _close(on["losses"], off["losses"])
        _close(on["kernels"], off["kernels"])
        assert not np.allclose(on["kernels"][0], on["kernels"][-1])
    # Both workers end with identical weights (all-reduce outside XLA keeps them in sync).
    for a, b in zip(workers[0]["on"]["weights"], workers[1]["on"]["weights"]):
        np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    if sys.argv[1:2] == ["multi_worker"]:
        _multi_worker(sys.argv[2])
    else:
        print(json.dumps(_scenarios()), flush=True)


def test_weight_regularizers_train_under_xla_like_without_it():
    """Keras reads regularized weights through the stateless scope; every weight must be mapped into it."""
    import keras

    from tfpar.step import xla

    x = np.random.default_rng(5).normal(size=(2, 16, 4)).astype("float32")
    y = np.ones((16, 2), "float32")
    losses = {}
    for jit in ("off", "on"):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1))])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        xla.enable(model, jit)
        history = model.fit(x[0], y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        losses[jit] = history.history["loss"] + [model.evaluate(x[1], y, verbose=0)]
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=RTOL, atol=ATOL)
