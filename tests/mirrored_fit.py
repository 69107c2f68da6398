"""MirroredStrategy checks on 2 virtual CPUs, in their own process (devices are set once per process).

Usage: python mirrored_fit.py equivalence|precision OUT.json

equivalence: the same small model (no BatchNormalization: per-replica batch
statistics would legitimately differ), seed and global batch trained on one
device and mirrored over 2 CPUs; writes both weight lists' max difference.
precision: fits under mirrored with mixed_float16 and mixed_bfloat16; writes
losses and the optimizer class for each.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpar.runtime import strategies  # noqa: E402

strategies.configure_virtual_cpus(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfpar.runtime import precision  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
rng = np.random.RandomState(0)
x = rng.uniform(size=(256, 8, 8, 1)).astype("float32")
y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")


def fit(strategy, policy="float32", bn=False, epochs=3):
    keras.backend.clear_session()
    precision.apply(policy, strategy)
    keras.utils.set_random_seed(1)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    with strategy.scope():
        layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu")]
        layers += [keras.layers.BatchNormalization()] if bn else []
        layers += [keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    history = model.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    return model, history.history["loss"]


if mode == "equivalence":
    one, one_loss = fit(strategies.create("one_device", devices=["/cpu:0"]))
    mirrored = strategies.create("mirrored")
    two, two_loss = fit(mirrored)
    diff = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(one.weights, two.weights))
    result = {"replicas": mirrored.num_replicas_in_sync, "max_abs_diff": diff,
              "one_device_loss": one_loss, "mirrored_loss": two_loss}
else:
    result = {}
    for policy in ("mixed_float16", "mixed_bfloat16"):
        strategy = strategies.create("mirrored")
        model, loss = fit(strategy, policy, bn=True, epochs=4)
        result[policy] = {"replicas": strategy.num_replicas_in_sync, "loss": loss,
                          "optimizer": type(model.optimizer).__name__,
                          "compute_dtype": model.layers[0].compute_dtype}
with open(out, "w") as f:
    json.dump(result, f)
