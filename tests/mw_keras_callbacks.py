"""One worker of plain Keras ``fit`` with Keras's own saving callbacks (run by tests through tfpar-launch).

Usage: python mw_keras_callbacks.py OUT_DIR [--raw] [--epochs=N] [--backup_freq=epoch|N] [--keep]
       [--kill_worker_1_before_step=S]

The only tfpar line is ``tfpar.compat.apply()`` (skipped with ``--raw``);
everything else is the Keras 3 user's code: ``keras.callbacks.BackupAndRestore``
into OUT_DIR/backup (``double_checkpoint=True``), ``ModelCheckpoint`` of the
weights every epoch and of the best ``.keras`` model, and ``model.save`` at
the end. Every step trains on the same 32 rows (16 distinct ones, twice), so
a run resumed mid-epoch sees the data an uninterrupted run saw.
``--kill_worker_1_before_step=S`` SIGKILLs worker 1 before global step S on
the first attempt (a marker file tells a restarted cluster apart). Writes
OUT_DIR/result-<task>.json with the history, the step count and the weights,
and OUT_DIR/writes-<task>.log: every file or directory under OUT_DIR this
process created, wrote, renamed or removed (Python's audit events; h5py's own
C-level writes are not seen).
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

out_dir = os.path.abspath(sys.argv[1])
os.makedirs(out_dir, exist_ok=True)
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}-{task['index']}"
OWN = {f"writes-{name}.log", f"result-{name}.json", "killed"}  # this script's own bookkeeping
writes_log = open(os.path.join(out_dir, f"writes-{name}.log"), "a", buffering=1)


def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if writing else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        paths = [args[0]]
    elif event in ("os.rename", "os.replace"):
        paths = list(args[:2])
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(out_dir + os.sep) and os.path.basename(path) not in OWN:
                writes_log.write(f"{event} {path}\n")


sys.addaudithook(_audit)
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[2:] if a.startswith("--"))
if "raw" not in flags:
    import tfpar.compat

    tfpar.compat.apply()
epochs = int(flags.get("epochs", 3))
backup_freq = flags.get("backup_freq", "epoch")
backup_freq = backup_freq if backup_freq == "epoch" else int(backup_freq)
kill_before = int(flags.get("kill_worker_1_before_step", 0))

strategy = tf.distribute.MultiWorkerMirroredStrategy()

keras.utils.set_random_seed(0)
rng = np.random.RandomState(0)
x = rng.normal(size=(16, 8)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int32")
dataset = tf.data.Dataset.from_tensors((np.concatenate([x, x]), np.concatenate([y, y]))).repeat()

with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])


class KillWorker1(keras.callbacks.Callback):
    """SIGKILL worker 1 before global step ``kill_before``, once."""

    def on_train_batch_begin(self, batch, logs=None):
        marker = os.path.join(out_dir, "killed")
        if name == "worker-1" and int(self.model.optimizer.iterations.numpy()) + 1 == kill_before \
                and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [
    keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"), save_freq=backup_freq,
                                     double_checkpoint=True, delete_checkpoint="keep" not in flags),
    keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "ckpt", "weights-{epoch:02d}.weights.h5"),
                                    save_weights_only=True),
    keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "ckpt", "best.keras"), monitor="loss", save_best_only=True),
]
if kill_before:
    callbacks.append(KillWorker1())
history = model.fit(dataset, epochs=epochs, steps_per_epoch=5, callbacks=callbacks, verbose=0)
model.save(os.path.join(out_dir, "model.keras"))

with open(os.path.join(out_dir, f"result-{name}.json"), "w") as f:
    json.dump({"epochs_run": len(history.history["loss"]), "loss": history.history["loss"],
               "iterations": int(model.optimizer.iterations.numpy()),
               "weights": [np.asarray(w).tolist() for w in model.get_weights()]}, f)
print(f"{name} finished", flush=True)
