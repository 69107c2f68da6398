"""Run by tests/test_pipeline.py in a subprocess with 4 virtual CPUs; writes results as JSON.

Not a test module: logical devices must be configured before TensorFlow
starts, which a shared pytest process cannot promise. ``equivalence`` trains
pipelines and their unsplit references; ``placement`` trains one pipeline
with TF's device placement log on (read by the test from stderr);
``interleaved`` trains interleaved 1F1B against the unsplit model and 1F1B.
"""

import json
import os
import sys

MODE = sys.argv[1]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if MODE == "placement" else "2"

from tfpar.runtime import strategies  # noqa: E402

strategies.configure_virtual_cpus(4)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if MODE == "placement":
    tf.debugging.set_log_device_placement(True)  # only takes effect before TF's context starts

from tfpar import models  # noqa: E402
from tfpar.parallel import pipeline
from tfpar.step import steps
from tfpar.parallel.pipeline import stages as stages_lib  # noqa: E402

STEPS = 3
BATCH = 16


def build(name):
    keras.utils.set_random_seed(0)
    if name == "sequential":  # BN-free and Sequential
        return keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu", name="c1"),
            keras.layers.MaxPooling2D(name="p1"), keras.layers.Conv2D(8, 3, activation="relu", name="c2"),
            keras.layers.GlobalAveragePooling2D(name="g"), keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(10, activation="softmax", name="out")], name="sequential")
    return models.build(name, num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125, dropout=0.0)


def data():
    rng = np.random.RandomState(0)
    return rng.rand(BATCH * STEPS, 32, 32, 3).astype("float32"), (np.arange(BATCH * STEPS) % 10).astype("int32")


def compile_(model):
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", jit_compile=False)


def train(model):
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return history.history["loss"][-1]


def max_rel(a_weights, b_weights):
    """The largest |a - b| / (1e-5 |b| + 1e-6) over every weight: at most 1 when they agree to rtol 1e-5."""
    return float(max(np.max(np.abs(a - b) / (1e-5 * np.abs(b) + 1e-6)) for a, b in zip(a_weights, b_weights)))


def update_error(a_weights, b_weights, start):
    """||a - b|| / ||b - start|| over all weights: how far apart two runs ended, per unit of training."""
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(a_weights, b_weights)))
    moved = np.sqrt(sum(np.sum((b - s) ** 2) for b, s in zip(b_weights, start)))
    return float(diff / moved)


def compare(model, ref, start):
    weights = model.get_weights()
    return {"max_rel": max_rel(weights, ref), "update_error": update_error(weights, ref, start),
            "moved": max_rel(ref, start)}


def reference(name, precision, accumulate=1):
    keras.mixed_precision.set_dtype_policy(precision)
    model = build(name)
    start = [w.copy() for w in model.get_weights()]
    compile_(model)
    steps.accumulate(model, accumulate)
    loss = train(model)
    return model.get_weights(), start, loss


# float32: every model, S and schedule; mixed_bfloat16: every model at (2, gpipe) and (4, 1f1b).
GRID = {"float32": [(2, "gpipe"), (2, "1f1b"), (4, "gpipe"), (4, "1f1b")],
        "mixed_bfloat16": [(2, "gpipe"), (4, "1f1b")]}


def equivalence(save):
    out = {"cases": []}
    for precision, grid in GRID.items():
        for name in ("alexnet", "vgg11", "sequential"):
            ref, start, ref_loss = reference(name, precision)
            # Under mixed precision also against tfpar's accumulation over the same micro-batches: the same
            # half-precision roundings, so what is left is the pipeline's own difference.
            accumulated = reference(name, precision, accumulate=4)[0] if precision != "float32" else None
            for stages, schedule in grid:
                keras.mixed_precision.set_dtype_policy(precision)
                model = build(name)
                same_start = update_error(model.get_weights(), start, [0 * w for w in start])
                piped = pipeline.split(model, stages=stages, micro_batches=4, schedule=schedule,
                                       balance="layers", print_fn=None)
                compile_(piped)
                loss = train(piped)
                out["cases"].append({
                    "model": name, "precision": precision, "stages": stages, "schedule": schedule,
                    **compare(model, ref, start), "same_start": same_start,
                    **({"vs_accumulation": compare(model, accumulated, start)} if accumulated else {}), "loss": loss, "ref_loss": ref_loss,
                    "devices": sorted({w.value.device[-5:] for w in model.weights}),
                    "updates": int(piped.optimizer.iterations.numpy())})
                save(out)
    keras.mixed_precision.set_dtype_policy("mixed_float16")  # LossScaleOptimizer: scaled loss, unscaled update
    ref, start, _ = reference("alexnet", "mixed_float16")
    accumulated = reference("alexnet", "mixed_float16", accumulate=4)[0]
    model = build("alexnet")
    piped = pipeline.split(model, stages=2, micro_batches=4, balance="params", print_fn=None)
    compile_(piped)
    out["float16"] = {"optimizer": type(piped.optimizer).__name__, "loss": train(piped),
                      "scale": float(piped.optimizer.dynamic_scale.numpy()),
                      **compare(model, ref, start), "vs_accumulation": compare(model, accumulated, start)}
    save(out)
    keras.mixed_precision.set_dtype_policy("float32")
    # BatchNormalization: as tfpar's gradient accumulation over the same micro-batches.
    ref, start, _ = reference("vgg11_bn", "float32", accumulate=4)
    model = build("vgg11_bn")
    piped = pipeline.split(model, stages=2, micro_batches=4, balance="flops", print_fn=None)
    compile_(piped)
    train(piped)
    out["batch_norm"] = {**compare(model, ref, start), "variables": len(model.get_weights())}
    save(out)
    # 1F1B memory: count what each stage holds while the step is built in schedule order.
    held = {}
    for schedule in ("gpipe", "1f1b"):
        model = build("alexnet")
        piped = pipeline.split(model, stages=4, micro_batches=8, schedule=schedule, balance="layers", print_fn=None)
        piped.plan.trace = stages_lib.Trace()
        compile_(piped)
        x, y = data()
        piped.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)
        held[schedule] = [piped.plan.trace.held()[(0, s)] for s in range(4)]
    out["held"] = held
    # Hybrid: 2 copies x 2 stages on 4 devices equals the unsplit model on the whole batch.
    ref, start, _ = reference("alexnet", "float32")
    model = build("alexnet")
    piped = pipeline.split(model, stages=2, micro_batches=2, replicas=2, balance="layers", print_fn=None)
    compile_(piped)
    train(piped)
    out["hybrid"] = {**compare(model, ref, start), "devices": piped.plan.devices}
    # balance="time" measures every unit and returns a full table.
    model = build("resnet18")
    piped = pipeline.split(model, stages=2, micro_batches=2, balance="time", print_fn=None)
    out["time_table"] = piped.stage_table
    return out


def placement(save):
    model = build("alexnet")
    piped = pipeline.split(model, stages=2, micro_batches=2, balance="layers", print_fn=None)
    compile_(piped)
    x, y = data()
    piped.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)

    @tf.function
    def naive(images):  # the same stages with one tape.gradient call on CPU:0 (tensorflow/tensorflow#33688)
        with tf.GradientTape() as tape:
            h = images
            for s, (stage, device) in enumerate(zip(piped.plan.stages, piped.plan.devices)):
                with tf.device(device), tf.name_scope(f"naive{s}"):
                    h = stage(h, training=True)
            loss = tf.reduce_mean(h)
        with tf.device(piped.plan.devices[0]):
            return tape.gradient(loss, model.trainable_weights)

    naive(tf.constant(x[:8]))
    return {"devices": piped.plan.devices,
            "cut": [row["last_layer"] for row in piped.stage_table]}


def interleaved(save):
    """Interleaved 1F1B, 4 stages on 2 CPUs, against the unsplit model and 1F1B on 4 CPUs; what each device holds."""
    def mlp():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        h = inputs
        for i in range(4):
            h = keras.layers.Dense(24, activation="relu", name=f"d{i}")(h)
        return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="out")(h), name="mlp")

    rng = np.random.RandomState(0)
    x, y = rng.rand(BATCH * STEPS, 12).astype("float32"), (np.arange(BATCH * STEPS) % 10).astype("int32")

    def fit(model):
        compile_(model)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)

    out = {}
    ref = mlp()
    start = ref.get_weights()
    fit(ref)
    runs = {"1f1b": dict(schedule="1f1b", devices=[f"/cpu:{i}" for i in range(4)]),
            "interleaved_1f1b": dict(schedule="interleaved_1f1b", devices=["/cpu:0", "/cpu:1"])}
    weights = {}
    for name, kw in runs.items():
        model = mlp()
        piped = pipeline.split(model, stages=4, micro_batches=4, balance="layers", print_fn=None, **kw)
        fit(piped)
        weights[name] = model.get_weights()
        out[name] = {**compare(model, ref.get_weights(), start), "updates": int(piped.optimizer.iterations.numpy()),
                     "stage_devices": [d[-5:] for d in piped.plan.devices],
                     "variable_devices": [sorted({w.value.device[-5:] for w in stage.weights})
                                          for stage in piped.plan.stages]}
    out["vs_1f1b"] = max_rel(weights["interleaved_1f1b"], weights["1f1b"])
    # What each device holds while the step is built in schedule order, at M = 8.
    model = mlp()
    piped = pipeline.split(model, stages=4, micro_batches=8, schedule="interleaved_1f1b", devices=["/cpu:0", "/cpu:1"],
                           balance="layers", print_fn=None)
    piped.plan.trace = stages_lib.Trace()
    compile_(piped)
    piped.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)
    held = piped.plan.trace.held_per_device()
    out["held"] = [held[(0, d)] for d in range(2)]
    out["held_per_stage"] = [piped.plan.trace.held()[(0, s)] for s in range(4)]
    return out


if __name__ == "__main__":
    def save(result):
        with open(sys.argv[2] + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])

    save({"equivalence": equivalence, "placement": placement, "interleaved": interleaved}[MODE](save))
