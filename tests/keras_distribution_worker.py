"""Run by tests/test_keras_distribution.py in a subprocess on 4 logical CPUs; writes its results as JSON.

    keras_distribution_worker.py OUT.json [--gemma]            every single-process check, 4 logical CPUs
    keras_distribution_worker.py --process ID JOBS OUT_DIR      one of 2 processes of one 2x2 mesh (2 CPUs each)
    keras_distribution_worker.py --process launched OUT_DIR     the same, started by tfpar-launch (TF_CONFIG)

Every model here is plain Keras code written for ``keras.distribution`` (as
on JAX), with one tfpar line: ``tfpar.compat.apply()``. Each sharded run is
compared with an unsharded run of the same model from the same weights.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * (2 if "--process" in sys.argv else 4))

import keras  # noqa: E402

import tfpar.compat  # noqa: E402

STEPS, BATCH = 3, 8


def mlp():
    """The keras.io guide's model shape, small: d1 split by columns, d2 by rows."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="d2")(x))


def data(n=STEPS * BATCH):
    rng = np.random.RandomState(0)
    return rng.rand(n, 8).astype("float32"), rng.rand(n, 4).astype("float32")


def fit_losses(model, x, y, compiled=False):
    """3 SGD-momentum steps of plain ``fit`` (``x`` arrays or a batched dataset); the running loss after each."""
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: losses.append(float(logs["loss"])))
    if not compiled:
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    batch_size = None if y is None else BATCH
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    return losses


def max_diff(a, b):
    return float(max(np.abs(np.asarray(u) - np.asarray(v)).max() for u, v in zip(a, b)))


def spec(variable):
    layout = getattr(variable.value, "tfpar_layout", None)
    return None if layout is None else [None if a == "unsharded" else a for a in layout.sharding_specs]


def error_of(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test reads the type and the sentence
        return f"{type(err).__name__}: {err}"
    return None


def equivalence(make_distribution, initial, reference, use_scope):
    x, y = data()
    distribution = make_distribution()
    if use_scope:
        keras.distribution.set_distribution(None)
        with distribution.scope():
            model = mlp()
            model.set_weights(initial)
            model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        losses = fit_losses(model, x, y, compiled=True)  # outside the scope: the model keeps its mesh
    else:
        keras.distribution.set_distribution(distribution)
        model = mlp()
        model.set_weights(initial)
        losses = fit_losses(model, x, y)
    slots = {v.path.rpartition("/")[2]: spec(v) for v in model.optimizer.variables if "d1_kernel" in v.path}
    return model, {"losses": losses, "reference": reference["losses"],
                   "max_weight_diff": max_diff(model.get_weights(), reference["weights"]),
                   "specs": {v.path: spec(v) for v in model.weights}, "slots": slots,
                   "local_shapes": [list(c.shape) for c in tf.experimental.dtensor.unpack(tf.convert_to_tensor(model.weights[0].value))]}


def guide(devices):
    """The keras.io guide's code path, on 4 devices instead of 8."""
    out = {}
    mesh_1d = keras.distribution.DeviceMesh(shape=(4,), axis_names=["data"], devices=devices)
    layout = keras.distribution.TensorLayout(axes=("data", None), device_mesh=mesh_1d)
    out["tensor_layout"] = str(layout.backend_layout.sharding_specs)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x, y = data(32)
    model = mlp()
    model.compile(loss="mse", optimizer=keras.optimizers.Adam(1e-3))
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [keras.callbacks.ModelCheckpoint(os.path.join(tmp, "best.weights.h5"), save_weights_only=True),
                     keras.callbacks.BackupAndRestore(os.path.join(tmp, "backup"), delete_checkpoint=False)]
        out["data_parallel_history"] = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                                                 callbacks=callbacks).history["loss"]
        out["checkpoint_files"] = sorted(os.listdir(tmp))
    mesh_2d = keras.distribution.DeviceMesh(shape=(2, 2), axis_names=["data", "model"], devices=devices)
    layout_map = keras.distribution.LayoutMap(mesh_2d)
    layout_map["d1/kernel"] = (None, "model")
    layout_map["d1/bias"] = ("model",)
    layout_map["d2/output"] = ("data", None)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="data"))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = mlp()
    model.compile(loss="mse", optimizer=keras.optimizers.Adam(1e-3))
    out["model_parallel_history"] = model.fit(dataset, epochs=2, verbose=0).history["loss"]
    out["model_parallel_evaluate"] = float(model.evaluate(dataset, verbose=0))
    out["d1_kernel_spec"] = spec(model.get_layer("d1").kernel)
    keras.distribution.set_distribution(None)
    return out


def whole_values(model_2x2, tmp):
    """predict on any NumPy length, model(x), save_weights and model.save from a 2x2 mesh, loaded unsharded."""
    x, _ = data(13)
    out = {}
    path = os.path.join(tmp, "mlp.weights.h5")
    model_2x2.save_weights(path)
    keras.distribution.set_distribution(None)
    plain = mlp()
    plain.load_weights(path)
    out["load_bit_exact"] = all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), model_2x2.get_weights()))
    out["plain_is_tf_variable"] = type(plain.weights[0].value).__name__
    full = os.path.join(tmp, "mlp.keras")
    model_2x2.save(full)
    loaded = keras.saving.load_model(full)
    out["model_save_bit_exact"] = all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(),
                                                                           model_2x2.get_weights()))
    expected = plain.predict(x, verbose=0)
    out["predict_13_diff"] = float(np.abs(model_2x2.predict(x, verbose=0) - expected).max())
    out["predict_13_shape"] = list(model_2x2.predict(x, verbose=0).shape)
    out["call_diff"] = float(np.abs(np.asarray(model_2x2(x[:8])) - expected[:8]).max())
    out["call_13_diff"] = float(np.abs(np.asarray(model_2x2(x)) - expected).max())
    plain.compile(keras.optimizers.SGD(0.1), "mse")
    y = np.ones((8, 4), "float32")
    model_2x2.reset_metrics()  # Keras 3.10's test_on_batch keeps fit's running loss; 3.15 resets it
    out["test_on_batch"] = [float(model_2x2.test_on_batch(x[:8], y)), float(plain.test_on_batch(x[:8], y))]
    out["predict_on_batch_diff"] = float(np.abs(model_2x2.predict_on_batch(x[:8]) - expected[:8]).max())
    before = int(model_2x2.optimizer.iterations)
    out["train_on_batch_finite"] = bool(np.isfinite(float(model_2x2.train_on_batch(x[:8], y))))
    out["train_on_batch_steps"] = int(model_2x2.optimizer.iterations) - before
    return out


def bad_input(devices):
    from tfpar.parallel.sharding import keras_distribution

    dist = keras.distribution
    out = {}
    mesh = dist.DeviceMesh((2, 2), ["batch", "model"], devices=devices)
    out["unknown_axis"] = error_of(lambda: dist.LayoutMap(mesh).__setitem__("d1/kernel", (None, "tensor")))
    uneven = dist.LayoutMap(mesh)
    uneven["d2/kernel"] = ("model", None)  # 16 rows split in 2: fine; the 4 columns below are not
    uneven["d2/bias"] = ("model",)

    def build_uneven():
        with dist.ModelParallel(layout_map=uneven).scope():
            inputs = keras.Input((8,))
            keras.Model(inputs, keras.layers.Dense(3, name="d2")(inputs))
    out["uneven"] = error_of(build_uneven)
    big = dist.DeviceMesh((8,), ["batch"], devices=[f"cpu:{i}" for i in range(8)])

    def build_on_big():
        with dist.DataParallel(device_mesh=big).scope():
            mlp()
    out["mesh_too_big"] = error_of(build_on_big)
    dist.set_distribution(None)
    out["process_id"] = error_of(lambda: dist.initialize("127.0.0.1:1,127.0.0.1:2", 2, 2))
    before = mlp()
    dist.set_distribution(dist.DataParallel(devices=devices))
    out["built_before"] = error_of(lambda: before.compile("sgd", "mse"))

    class Custom(dist.DataParallel):
        pass
    dist.set_distribution(Custom(devices=devices))
    out["custom"] = error_of(mlp)
    dist.set_distribution(None)
    out["error_type"] = keras_distribution.DistributionError.__mro__[1].__name__
    return out


def mixed_bfloat16(devices, initial, x, y):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        plain = mlp()
        plain.set_weights(initial)
        reference = fit_losses(plain, x, y)
        layout_map = keras.distribution.LayoutMap(keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices))
        layout_map["d1/kernel"] = (None, "model")
        layout_map["d2/kernel"] = ("model", None)
        with keras.distribution.ModelParallel(layout_map=layout_map).scope():
            model = mlp()
            model.set_weights(initial)
            losses = fit_losses(model, x, y)
        return {"losses": losses, "reference": reference, "weight_dtype": model.weights[0].dtype,
                "max_weight_diff": max_diff(model.get_weights(), plain.get_weights())}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def gemma(devices):
    """keras-hub's tiny Gemma with its own get_layout_map, trained by plain fit, against one device."""
    import keras_hub

    def backbone():
        return keras_hub.models.GemmaBackbone(vocabulary_size=64, num_layers=1, num_query_heads=2,
                                              num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
                                              head_dim=8)

    rng = np.random.RandomState(1)
    x = {"token_ids": rng.randint(0, 64, (STEPS * BATCH, 8)).astype("int32"),
         "padding_mask": np.ones((STEPS * BATCH, 8), "int32")}
    y = rng.rand(STEPS * BATCH, 8, 16).astype("float32")
    keras.utils.set_random_seed(2)
    plain = backbone()
    initial = plain.get_weights()
    reference = fit_losses(plain, x, y)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices=devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    model = backbone()
    model.set_weights(initial)
    losses = fit_losses(model, x, y)
    keras.distribution.set_distribution(None)
    return {"losses": losses, "reference": reference,
            "max_weight_diff": max_diff(model.get_weights(), plain.get_weights()),
            "query_spec": spec(model.get_layer("decoder_block_0").attention.query_dense.kernel),
            "embedding_spec": spec(model.get_layer("token_embedding").embeddings)}


def main(out_path, with_gemma):
    result = {"applied": "keras_distribution_tf" in tfpar.compat.apply()}
    devices = keras.distribution.list_devices()
    result["devices"] = devices
    keras.utils.set_random_seed(0)
    plain = mlp()
    initial = plain.get_weights()
    x, y = data()
    reference = {"losses": fit_losses(plain, x, y), "weights": plain.get_weights()}

    def model_parallel():
        layout_map = keras.distribution.LayoutMap(keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices))
        layout_map["d1/kernel"] = (None, "model")
        layout_map["d1/bias"] = ("model",)
        layout_map["d2/kernel"] = ("model", None)
        return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    _, result["data_parallel"] = equivalence(lambda: keras.distribution.DataParallel(devices=devices),
                                             initial, reference, use_scope=False)
    model_2x2, result["model_parallel"] = equivalence(model_parallel, initial, reference, use_scope=True)
    result["after_scope"] = keras.distribution.distribution() is None
    keras.distribution.set_distribution(None)
    result["after_none"] = type(mlp().weights[0].value).__name__
    result["guide"] = guide(devices)
    with tempfile.TemporaryDirectory() as tmp:
        result["whole"] = whole_values(model_2x2, tmp)
    result["bad"] = bad_input(devices)
    result["bf16"] = mixed_bfloat16(devices, initial, x, y)
    if with_gemma:
        result["gemma"] = gemma(devices)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)


def process(index, jobs, out_dir):
    """``keras.distribution.initialize`` as on JAX, then ModelParallel on one 2x2 mesh over both processes."""
    tfpar.compat.apply()
    if jobs is None:  # started by tfpar-launch: the cluster comes from TF_CONFIG
        keras.distribution.initialize()
        index = tf.experimental.dtensor.client_id()
    else:
        keras.distribution.initialize(job_addresses=jobs, num_processes=2, process_id=index)
    devices = keras.distribution.list_devices()
    keras.utils.set_random_seed(0)
    plain = mlp()
    initial = plain.get_weights()
    x, y = data()
    reference = fit_losses(plain, x, y)
    layout_map = keras.distribution.LayoutMap(keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices))
    layout_map["d1/kernel"] = (None, "model")
    layout_map["d2/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    model = mlp()
    model.set_weights(initial)
    # Every process opens the same global dataset; Keras's distribute_dataset gives each its half of a batch.
    losses = fit_losses(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), None)
    weights = model.get_weights()
    result = {"process": index, "devices": devices,
              "num_processes": keras.src.backend.distribution_lib.num_processes(),
              "multi_process": distribution._is_multi_process,  # what Keras's distribute_dataset reads
              "losses": losses, "reference": reference,
              "max_weight_diff": max_diff(weights, plain.get_weights()),
              "local_shapes": [list(c.shape) for c in tf.experimental.dtensor.unpack(
                  tf.convert_to_tensor(model.get_layer("d1").kernel.value))],
              "weights_sum": float(sum(np.abs(w).astype("float64").sum() for w in weights))}
    path = os.path.join(out_dir, f"{index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    wait_for_the_other(out_dir)


def wait_for_the_other(out_dir, timeout=300):
    """Exit once both have written: a process that exits early takes its collective server down under the other."""
    import glob
    import time

    deadline = time.monotonic() + timeout
    while len(glob.glob(os.path.join(out_dir, "*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)


if __name__ == "__main__":
    if sys.argv[1] == "--process" and sys.argv[2] == "launched":
        process(None, None, sys.argv[3])
    elif sys.argv[1] == "--process":
        process(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1], "--gemma" in sys.argv[2:])
