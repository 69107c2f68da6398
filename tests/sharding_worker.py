"""Run by tests/test_sharding.py in a subprocess; writes results as JSON.

    sharding_worker.py OUT.json            every single-process check, on 4 virtual CPUs
    sharding_worker.py --client OUT.json   one DTensor client of a 2x2 mesh (2 virtual CPUs each;
                                           DTENSOR_* variables set by the test)

Not a test module: DTensor needs the logical devices set before TensorFlow
starts, which a shared pytest process cannot promise. Every sharded model
here is plain Keras built and compiled inside ``layout_scope`` and trained
with ``model.fit``.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpar.parallel import sharding  # noqa: E402

MESHES = ["batch=4,model=1", "batch=2,model=2", "batch=1,model=4"]
STEPS = 3
BATCH = 8


def build(num_classes=8):
    """A user's own small Keras model, its layers named as tfpar's VGG rules expect."""
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for block, width in ((1, 8), (2, 16)):
        x = layers.Conv2D(width, 3, padding="same", name=f"block{block}_conv1")(x)
        x = layers.BatchNormalization(name=f"block{block}_conv1_bn")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(layers.ReLU()(x))
    x = layers.Flatten(name="flatten")(x)  # 2 x 2 x 16 = 64
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    x = layers.Dense(64, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="small_vgg")


def optimizer(name):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(0.05, momentum=0.9)
    if name == "sgd_fp16":  # a scale at which this model's float16 gradients fit, so steps apply
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**8)
    # epsilon 1e-4: the biases before BatchNormalization have zero gradient up to
    # round-off, which Adam's default 1e-7 would turn into whole steps of noise.
    return keras.optimizers.Adam(0.001, epsilon=1e-4)


def data(num_classes=8, steps=STEPS):
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.rand(steps * BATCH, 8, 8, 3).astype("float32")
    y = rng.randint(0, num_classes, steps * BATCH).astype("int32")
    return x, y


def compile_model(model, opt):
    import keras

    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def fit_steps(model, x, y):
    """``model.fit`` over the batches in order; the running loss after each step."""
    import keras

    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    return losses


def max_diff(a, b):
    import numpy as np

    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


def reference(opt_name, initial=None, policy="float32"):
    """Plain Keras, no mesh, from ``initial`` weights (or fresh ones from seed 0)."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = compile_model(build(), optimizer(opt_name))
    if initial is not None:
        model.set_weights(initial)
    start = model.get_weights()
    x, y = data()
    losses = fit_steps(model, x, y)
    keras.mixed_precision.set_global_policy("float32")
    return {"initial": start, "losses": losses, "final": model.get_weights(), "model": model}


def sharded(spec, rules, opt_name, initial, policy="float32"):
    import keras

    keras.mixed_precision.set_global_policy(policy)
    with sharding.layout_scope(sharding.mesh(spec), rules) as layouts:
        model = compile_model(build(), optimizer(opt_name))
    model.set_weights(initial)
    x, y = data()
    losses = fit_steps(model, x, y)
    keras.mixed_precision.set_global_policy("float32")
    return model, layouts, losses


def layout_map(spec):
    import keras

    from tfpar.parallel.sharding import meshes

    shape = meshes.parse(spec)
    mesh = keras.distribution.DeviceMesh(tuple(shape.values()), list(shape))
    lm = keras.distribution.LayoutMap(mesh)
    lm["fc1/kernel"] = (None, "model")
    lm["fc1/bias"] = ("model",)
    lm["fc2/kernel"] = ("model", None)
    lm["predictions/kernel"] = keras.distribution.TensorLayout((None, "model"))
    lm[r".*conv\d/kernel"] = (None, None, None, "model")
    return lm


SHAPE_PATHS = ("fc1/kernel", "fc2/kernel", "predictions/kernel", "block1_conv1/kernel", "fc2/bias",
               "block1_conv1_bn/gamma")


def shapes(model):
    from tfpar.parallel.sharding import variables

    by_path = {w.path: w for w in model.weights}
    return {p: [list(by_path[p].shape), [list(s) for s in variables.local_shapes(by_path[p])]] for p in SHAPE_PATHS}


def slot_shapes(model):
    from tfpar.parallel.sharding import variables

    slots = {v.path.rpartition("/")[2]: v for v in model.optimizer.variables}
    return {name: [list(s) for s in variables.local_shapes(v)] for name, v in slots.items()
            if name.startswith(("fc1_kernel_", "fc2_bias_"))}


def main(out_path):
    import keras
    import numpy as np

    mesh_error = None
    try:
        sharding.mesh("batch=3,model=1", virtual_cpus=4)
    except ValueError as err:
        mesh_error = str(err)
    sharding.mesh("batch=4", virtual_cpus=4)

    refs = {name: reference(name) for name in ("sgd", "adam")}
    initial = refs["sgd"]["initial"]
    out = {"mesh_error": mesh_error, "reference": {k: r["losses"] for k, r in refs.items()}, "runs": {}}
    kept = {}
    for spec in MESHES:
        for name in ("sgd", "adam"):
            model, layouts, losses = sharded(spec, sharding.default_rules("vgg11"), name, initial)
            out["runs"][f"rules {name} {spec}"] = {
                "losses": losses, "max_weight_diff": max_diff(model.get_weights(), refs[name]["final"]),
                "shapes": shapes(model), "slot_shapes": slot_shapes(model)}
            if name == "sgd" and spec == "batch=2,model=2":
                kept["2x2"] = model
        model, layouts, losses = sharded(spec, layout_map(spec), "adam", initial)
        out["runs"][f"layout_map adam {spec}"] = {
            "losses": losses, "max_weight_diff": max_diff(model.get_weights(), refs["adam"]["final"]),
            "shapes": shapes(model), "slot_shapes": slot_shapes(model),
            "specs": {p: list(layouts.specs[p]) for p in ("fc1/kernel", "predictions/kernel", "block2_conv1/kernel")}}

    out["save_weights"] = save_weights_across_meshes(kept["2x2"], refs["sgd"]["model"])
    out["fit"] = fit_evaluate_predict_callbacks(kept["2x2"], refs["sgd"]["model"])
    out["checkpoint"] = checkpoint_round_trip(initial)
    out["defaults"] = default_rules_degrade()
    out["precision"] = mixed_precision(initial)
    with open(out_path, "w") as f:
        json.dump(out, f)


def save_weights_across_meshes(model_2x2, plain):
    """``save_weights`` on 2x2 loads into an unsharded model and into a 1x4 one; both then train alike."""
    from tfpar.parallel.sharding import variables

    path = os.path.join(tempfile.mkdtemp(), "sharded.weights.h5")
    model_2x2.save_weights(path)
    saved = model_2x2.get_weights()
    keras_model = compile_model(build(), optimizer("sgd"))
    keras_model.load_weights(path)
    with sharding.layout_scope(sharding.mesh("batch=1,model=4"), sharding.default_rules("vgg11")):
        model_1x4 = compile_model(build(), optimizer("sgd"))
    model_1x4.load_weights(path)
    kernel = {w.path: w for w in model_1x4.weights}["fc1/kernel"]
    loaded = {"unsharded_equal": max_diff(keras_model.get_weights(), saved) == 0.0,
              "1x4_equal": max_diff(model_1x4.get_weights(), saved) == 0.0}
    x, y = data(steps=1)
    after = [fit_steps(m, x, y)[0] for m in (keras_model, model_1x4)]
    return {
        **loaded,
        "1x4_fc1_local_shapes": [list(s) for s in variables.local_shapes(kernel)],
        "next_step_losses": after,
        "saved_matches_reference": max_diff(saved, plain.get_weights()) < 1e-4,
    }


def fit_evaluate_predict_callbacks(model, plain):
    """Keras callbacks, validation, evaluate (13 = 8 + a short 5) and predict on the 2x2 model."""
    import keras
    import numpy as np
    import tensorflow as tf

    x, y = data()
    keras_x, keras_y = x[:13], y[:13]
    evaluate = model.evaluate(keras_x, keras_y, batch_size=BATCH, verbose=0, return_dict=True)
    evaluate_plain = plain.evaluate(keras_x, keras_y, batch_size=BATCH, verbose=0, return_dict=True)
    predict_diff = float(np.abs(model.predict(keras_x, batch_size=BATCH, verbose=0)
                                - plain.predict(keras_x, batch_size=BATCH, verbose=0)).max())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    val = tf.data.Dataset.from_tensor_slices((keras_x, keras_y)).batch(BATCH)
    log_dir = tempfile.mkdtemp()
    best = os.path.join(log_dir, "best.weights.h5")
    before = int(np.asarray(model.optimizer.iterations))
    history = model.fit(ds, epochs=2, steps_per_epoch=2, validation_data=val, verbose=0, callbacks=[
        keras.callbacks.TensorBoard(log_dir, write_graph=False),
        keras.callbacks.ModelCheckpoint(best, save_weights_only=True, monitor="val_loss", save_best_only=False)])
    events = [os.path.join(d, f) for d, _, files in os.walk(log_dir) for f in files if "tfevents" in f]
    tags = set()
    for path in events:
        for record in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in record.summary.value)
    reread = compile_model(build(), optimizer("sgd"))
    reread.load_weights(best)
    return {"history": history.history, "tags": sorted(tags), "evaluate": model.evaluate(val, verbose=0, return_dict=True),
            "evaluate_before": evaluate, "evaluate_plain": evaluate_plain, "predict_diff": predict_diff,
            "iterations": int(np.asarray(model.optimizer.iterations)) - before,
            "checkpoint_equal": max_diff(reread.get_weights(), model.get_weights()) == 0.0}


def checkpoint_round_trip(initial):
    """ShardedTrainer (the thin factory layer): save/restore of a sharded TF checkpoint with its slots."""
    import numpy as np

    from tfpar.parallel.sharding import variables

    dmesh = sharding.mesh("batch=2,model=2")
    make = lambda: sharding.ShardedTrainer(build, dmesh, sharding.default_rules("vgg11"),  # noqa: E731
                                           optimizer=lambda: optimizer("sgd"))
    trainer = make()
    trainer.set_weights(initial)
    x, y = data()
    for i in range(STEPS):
        trainer.train_on_batch(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    directory = os.path.join(tempfile.mkdtemp(), "ckpt")
    trainer.save(directory)
    saved = trainer.get_weights()
    saved_slots = [variables.host_value(v) for v in trainer.optimizer.variables]
    trainer.train_on_batch(x[:BATCH], y[:BATCH])  # move away from the saved state
    moved = max_diff(trainer.get_weights(), saved)
    trainer.restore(directory)
    fresh = make().restore(directory)
    kernel = {w.path: w for w in fresh.model.weights}["fc1/kernel"]
    return {
        "moved": moved,
        "restored_equal": all(np.array_equal(a, b) for a, b in zip(trainer.get_weights(), saved)),
        "fresh_equal": all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), saved)),
        "fresh_slots_equal": all(np.array_equal(variables.host_value(v), s)
                                 for v, s in zip(fresh.optimizer.variables, saved_slots)),
        "fresh_fc1_local_shapes": [list(s) for s in variables.local_shapes(kernel)],
        "iterations": int(variables.host_value(fresh.optimizer.iterations)),
    }


def default_rules_degrade():
    """10 classes on model=4 and a mesh with no model axis: defaults train, a user's rules fail."""
    import numpy as np

    from tfpar.parallel.sharding import report

    out = {}
    user = [(r"predictions/kernel$", (None, "model")), (r"fc1/kernel$", (None, "model"))]
    x, y = data(num_classes=10, steps=1)
    for spec in ("batch=1,model=4", "batch=4"):
        with sharding.layout_scope(sharding.mesh(spec), sharding.default_rules("vgg11")) as layouts:
            model = compile_model(build(10), optimizer("sgd"))
        before = model.get_weights()
        losses = fit_steps(model, x, y)
        rows = report.from_layouts(model, layouts)
        out[spec] = {"losses": losses, "moved": max_diff(model.get_weights(), before),
                     "specs": {p: list(layouts.specs[p]) for p in ("predictions/kernel", "fc1/kernel")},
                     "notes": report.adaptations(rows), "finite": bool(np.all(np.isfinite(losses)))}
        try:
            with sharding.layout_scope(sharding.mesh(spec), user):
                compile_model(build(10), optimizer("sgd"))
            out[spec]["user_error"] = None
        except ValueError as err:
            out[spec]["user_error"] = str(err)
    return out


def mixed_precision(initial):
    """mixed_bfloat16 and mixed_float16 (loss scaling) against plain Keras under the same policy."""
    import numpy as np

    out = {}
    for policy, spec in (("mixed_bfloat16", "batch=2,model=2"), ("mixed_float16", "batch=1,model=4"),
                         ("mixed_float16", "batch=2,model=2")):
        name = "sgd_fp16" if policy == "mixed_float16" else "sgd"
        ref = reference(name, initial, policy)
        model, _, losses = sharded(spec, sharding.default_rules("vgg11"), name, initial, policy)
        entry = {"reference": ref["losses"], "losses": losses,
                 "weight_dtypes": sorted({str(w.dtype) for w in model.weights}),
                 "optimizer": type(model.optimizer).__name__,
                 "max_weight_diff": max_diff(model.get_weights(), ref["final"])}
        if policy == "mixed_float16":
            entry["scale"] = float(np.asarray(model.optimizer.dynamic_scale))
            entry["reference_scale"] = float(np.asarray(ref["model"].optimizer.dynamic_scale))
            entry["iterations"] = int(np.asarray(model.optimizer.iterations))
        out[f"{policy} {spec}"] = entry
    return out


def client(out_path):
    """One client of a 2-process, 2x2 DTensor mesh: plain Keras fit, compared with plain Keras here."""
    import numpy as np
    from tensorflow.experimental import dtensor

    dmesh = sharding.mesh("batch=2,model=2", virtual_cpus=2)
    ref = reference("sgd")
    with sharding.layout_scope(dmesh, sharding.default_rules("vgg11")):
        model = compile_model(build(), optimizer("sgd"))
    model.set_weights(ref["initial"])
    x, y = data()
    losses = fit_steps(model, x, y)
    evaluate = model.evaluate(x[:13], y[:13], batch_size=BATCH, verbose=0, return_dict=True)
    kernel = {w.path: w for w in model.weights}["fc1/kernel"]
    from tfpar.parallel.sharding import variables

    with open(out_path + ".tmp", "w") as f:  # renamed once complete: the other client waits for the name
        json.dump({"client": dtensor.client_id(), "clients": dtensor.num_clients(),
                   "local_devices": len(dmesh.local_devices()), "global_devices": dtensor.num_global_devices("CPU"),
                   "losses": losses, "reference": ref["losses"],
                   "max_weight_diff": max_diff(model.get_weights(), ref["final"]),
                   "fc1_local_shapes": [list(s) for s in variables.local_shapes(kernel)],
                   "evaluate": evaluate, "weights_sum": float(sum(np.abs(w).sum() for w in model.get_weights()))}, f)
    os.replace(out_path + ".tmp", out_path)
    wait_for_the_other_client(out_path)


def wait_for_the_other_client(out_path, timeout=300):
    """Exit only once the other client has written its results too: a client that exits early takes its
    collective server down while the other may still be in its last gather (connection reset)."""
    import glob
    import time

    deadline = time.monotonic() + timeout
    while len(glob.glob(os.path.join(os.path.dirname(out_path), "*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the other client's last collective RPCs finish after it writes


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2])
    else:
        main(sys.argv[1])
