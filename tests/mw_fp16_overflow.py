"""One worker of a float16 multi-worker fit where only worker 1 overflows at first.

Usage: python mw_fp16_overflow.py OUT_DIR (run by tests through tfpar-launch).
Worker 1's first local batches are scaled so that its float16 gradients are
non-finite while worker 0's are finite. Correct loss scaling skips those steps
on *both* workers. Writes OUT_DIR/<task>.json with the optimizer's applied-step
count, its loss scale and a weights checksum.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from tfpar.runtime import precision, strategies  # noqa: E402

out_dir = sys.argv[1]
strategy = strategies.create("multi_worker")
precision.apply("mixed_float16", strategy)
task = json.loads(os.environ["TF_CONFIG"])["task"]
keras.utils.set_random_seed(0)
x = np.random.RandomState(task["index"]).normal(size=(64, 8)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int32")
if task["index"] == 1:
    x[:16] *= 3e3  # enough to overflow float16 gradients at the initial loss scale
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)  # 4 steps, each worker its own data
with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2, activation="softmax", dtype="float32")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
model.fit(ds, epochs=1, verbose=0)
digest = hashlib.sha256(b"".join(np.asarray(w.numpy(), "float32").tobytes() for w in model.weights)).hexdigest()
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"{task['type']}-{task['index']}.json"), "w") as f:
    json.dump({"applied_steps": int(model.optimizer.iterations.numpy()),
               "loss_scale": float(model.optimizer.dynamic_scale.numpy()),
               "all_finite": bool(all(np.isfinite(w.numpy()).all() for w in model.weights)),
               "weights_sha256": digest}, f)
print("worker finished", flush=True)
