"""One worker of a tiny multi-worker Keras fit/evaluate/predict (run by tests through tfpar-launch).

Usage: python mw_keras_fit.py OUT_DIR [--raw] [--precision=POLICY]
``--raw`` builds the strategy with plain TensorFlow and never calls
``tfpar.compat.apply()`` (to show the upstream defects); otherwise the
strategy comes from ``tfpar.strategies.create("multi_worker")``.
Writes OUT_DIR/<task>.json with the losses, predictions shape and a weights checksum.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

out_dir, raw = sys.argv[1], "--raw" in sys.argv
policy = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--precision=")), "float32")
if raw:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    from tfpar.runtime import strategies

    strategy = strategies.create("multi_worker")
from tfpar.runtime import precision  # noqa: E402

precision.apply(policy, strategy)
task = json.loads(os.environ["TF_CONFIG"])["task"]
keras.utils.set_random_seed(0)
rng = np.random.RandomState(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int32")
ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(32)
with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(momentum=0.5), keras.layers.Dense(2, activation="softmax", dtype="float32")])  # float32 outputs, as tfpar's models
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(ds, epochs=3, steps_per_epoch=4, verbose=0)
evaluation = model.evaluate(ds, steps=2, return_dict=True, verbose=0)
predictions = model.predict(tf.data.Dataset.from_tensor_slices(x[:64]).batch(16), verbose=0)
digest = hashlib.sha256(b"".join(np.asarray(w.numpy(), "float32").tobytes() for w in model.weights)).hexdigest()
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"{task['type']}-{task['index']}.json"), "w") as f:
    json.dump({"loss": history.history["loss"], "eval_loss": evaluation["loss"],
               "predictions_shape": list(predictions.shape), "weights_sha256": digest,
               "optimizer": type(model.optimizer).__name__, "policy": keras.mixed_precision.global_policy().name}, f)
print("worker finished", flush=True)
