"""Run ``tfpar-train`` and record which examples each training step trained on (a test driver).

Usage: record_examples.py RECORD_FILE KILL_AT_STEP -- tfpar-train flags...

The test images are one flat colour whose red value is the example's id:
crops, flips and resizing keep a flat image flat, so the id reads back from
the normalised input. A pass-through layer in front of the real model writes
one line of ids per training step. With KILL_AT_STEP > 0 the process
SIGKILLs itself while that step runs: a kill mid-epoch, after the backup of
the step before it was written.
"""

import os
import signal
import sys

from tfpar.run import cli, data, recipe
from tfpar.core import quiet

RECORD, KILL_AT = sys.argv[1], int(sys.argv[2])
quiet.start_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

steps = []


def _write(ids):
    steps.append(1)
    with open(RECORD, "a") as f:
        f.write(" ".join(str(v) for v in ids.numpy().tolist()) + "\n")
    if len(steps) == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


class RecordIds(keras.layers.Layer):
    def call(self, images, training=None):
        if training:
            red = images[:, 0, 0, 0] * data.STDDEV_RGB[0] + data.MEAN_RGB[0]
            done = tf.py_function(_write, [tf.cast(tf.round(red * 255.0), tf.int32)], tf.int32)
            with tf.control_dependencies([done]):
                images = tf.identity(images)
        return images


_build = recipe.build_model


def build_recording_model(config):
    model = _build(config)
    inputs = keras.Input(model.input_shape[1:])
    return keras.Model(inputs, model(RecordIds()(inputs)))


recipe.build_model = build_recording_model  # the driver builds through recipe.build_model
sys.exit(cli.main(["tfpar-train"] + sys.argv[sys.argv.index("--") + 1:]))
