"""Plain Keras ``BackupAndRestore(save_freq=2)`` interrupted mid-epoch and resumed, in one process.

``run(directory)`` trains 3 epochs of 5 steps uninterrupted, then again with
an exception before step 8 (the last backup is step 6: epoch 2, one step in),
then resumes with a new model and callback. Returns the step counts, the
epochs the resumed fit ran and whether its weights equal the uninterrupted
run's. As a script (``python keras_backup_resume.py DIR``) it applies
``tfpar.compat`` (honouring TFPAR_COMPAT_DISABLE) and prints that as JSON.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

STEPS, EPOCHS, INTERRUPT_BEFORE = 5, 3, 8


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    return model


def _data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    return tf.data.Dataset.from_tensors((x, (x[:, 0] > 0).astype("int32"))).repeat()  # the same batch every step


class Interrupt(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) + 1 == INTERRUPT_BEFORE:
            raise RuntimeError("interrupted")


def _fit(model, backup_dir, *extra):
    callback = keras.callbacks.BackupAndRestore(backup_dir, save_freq=2)
    return model.fit(_data(), epochs=EPOCHS, steps_per_epoch=STEPS, callbacks=[callback, *extra], verbose=0)


def run(directory):
    reference = _model()
    _fit(reference, os.path.join(directory, "reference"))
    backup_dir = os.path.join(directory, "backup")
    try:
        _fit(_model(), backup_dir, Interrupt())
    except RuntimeError:
        pass
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        saved = json.load(f)
    resumed = _model()
    history = _fit(resumed, backup_dir)
    same = all(np.array_equal(a, b) for a, b in zip(reference.get_weights(), resumed.get_weights()))
    return {"reference_steps": int(reference.optimizer.iterations.numpy()),
            "resumed_steps": int(resumed.optimizer.iterations.numpy()),
            "resumed_epochs": len(history.history["loss"]), "saved": saved, "same_weights": same}


if __name__ == "__main__":
    import tfpar.compat

    tfpar.compat.apply()
    print(json.dumps(run(sys.argv[1])))
