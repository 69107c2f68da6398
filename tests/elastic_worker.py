"""Run ``tfpar-train`` on a tiny BN-free, dropout-free model, for the elastic tests (a test driver).

Usage: elastic_worker.py RECORD KILL_AT_STEP -- tfpar-train flags...

- The model is one small convolution and a softmax layer: no batch statistics
  and no dropout, so runs that cut the same updates differently end equal.
- RECORD ("-": none) gets one line of example ids per training step, from
  flat images whose red value is the id (as tests/record_examples.py); in a
  cluster each worker writes RECORD.<workers>.<task index>.
- With KILL_AT_STEP > 0 the process SIGKILLs itself while that step runs
  (only worker TFPAR_TEST_KILL_WORKER when that is set), after creating the
  file RECORD.killed.
- TFPAR_TEST_ADD_HOST="PATH:NAME": a host comes back; at KILL_AT the worker
  first appends NAME to the hosts file PATH (tfpar-launch --hosts), and it
  neither appends nor dies when NAME is listed there already (so only once).
- TFPAR_TEST_FAIL_AT_START="I/N": worker I of an N-worker cluster exits 1 at
  once (a host that is gone); in a cluster of another size it trains.
  "I/N:PATH": only once the file PATH exists.
- At the end every process saves its weights as weights.<task>.npz in the
  model_dir, to compare runs to 1e-5.
"""

import json
import os
import signal
import sys

TASK = json.loads(os.environ.get("TF_CONFIG") or "{}")
INDEX = TASK.get("task", {}).get("index", 0)
SIZE = len(TASK.get("cluster", {}).get("worker", [0]))
FAIL, _, AFTER = os.environ.get("TFPAR_TEST_FAIL_AT_START", "").partition(":")
if FAIL == f"{INDEX}/{SIZE}" and (not AFTER or os.path.exists(AFTER)):
    print(f"worker {INDEX} of {SIZE}: failing at start (test hook)", flush=True)
    sys.exit(1)

from tfpar.core import quiet  # noqa: E402
from tfpar.run import cli, data, driver, recipe  # noqa: E402

RECORD, KILL_AT = sys.argv[1], int(sys.argv[2])
KILLED = None if RECORD == "-" else RECORD + ".killed"
if os.environ.get("TFPAR_TEST_KILL_WORKER", str(INDEX)) != str(INDEX):
    KILL_AT = 0
if RECORD != "-" and TASK:
    RECORD = f"{RECORD}.{SIZE}.{INDEX}"
quiet.start_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

steps = []
ADD_HOST = os.environ.get("TFPAR_TEST_ADD_HOST")


def _step(ids):
    steps.append(1)
    if RECORD != "-":
        with open(RECORD, "a") as f:
            f.write(" ".join(str(v) for v in ids.numpy().tolist()) + "\n")
    if len(steps) == KILL_AT and ADD_HOST:
        path, name = ADD_HOST.rsplit(":", 1)
        if name in open(path).read().split():
            return 0
        with open(path, "a") as f:
            f.write(name + "\n")
    if len(steps) == KILL_AT:
        if KILLED:
            open(KILLED, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


class StepHook(keras.layers.Layer):
    def call(self, images, training=None):
        if training:
            red = images[:, 0, 0, 0] * data.STDDEV_RGB[0] + data.MEAN_RGB[0]
            done = tf.py_function(_step, [tf.cast(tf.round(red * 255.0), tf.int32)], tf.int32)
            with tf.control_dependencies([done]):
                images = tf.identity(images)
        return images


def build_tiny(config):
    inputs = keras.Input((config.image_size, config.image_size, 3))
    x = StepHook()(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(config.num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


class SaveWeights(keras.callbacks.Callback):
    def __init__(self, model_dir):
        super().__init__()
        self.path = os.path.join(model_dir, f"weights.{INDEX}.npz")

    def on_train_end(self, logs=None):
        np.savez(self.path, *[np.asarray(w) for w in self.model.get_weights()])


_run = driver.run


def run_saving_weights(config, print_fn=print, callbacks=()):
    os.makedirs(config.model_dir, exist_ok=True)
    return _run(config, print_fn=print_fn, callbacks=(*callbacks, SaveWeights(config.model_dir)))


recipe.build_model = build_tiny  # the driver builds through recipe.build_model
driver.run = run_saving_weights  # the CLI calls driver.run
sys.exit(cli.main(["tfpar-train"] + sys.argv[sys.argv.index("--") + 1:]))
