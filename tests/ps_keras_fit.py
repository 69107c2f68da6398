"""Plain Keras 3 ``model.fit`` under a user-built ``ParameterServerStrategy`` (the chief of a cluster).

The official tutorial's pattern ("Parameter server training with
ParameterServerStrategy", Keras ``model.fit``) with ``tfpar.compat.apply()``
added. Run as the chief by ``tfpar-launch --workers 2 --ps 1``; writes what it
saw to ``argv[1]`` (JSON) for tests/test_ps_fit.py. ``argv[2] == "upstream"``
records how stock Keras fails instead (run with the fix disabled).
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf
import keras

import tfpar.compat

tfpar.compat.apply()

out_path = sys.argv[1]
work = os.path.dirname(out_path)
STEPS, EPOCHS = 9, 4  # with steps_per_execution=2: 4 scheduled functions of 2 steps, 1 of 1

cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
strategy = tf.distribute.ParameterServerStrategy(
    cluster_resolver,
    variable_partitioner=tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=256 << 10, max_shards=1))

rng = np.random.RandomState(0)
x = rng.rand(512, 8).astype("float32")
y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).astype("int32")


def dataset_fn(input_context):
    batch_size = input_context.get_per_replica_batch_size(32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512).repeat()
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return dataset.batch(batch_size).prefetch(2)


def make_model():
    with strategy.scope():
        model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
        model.compile(keras.optimizers.Adam(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], steps_per_execution=2)
    return model


class Record(keras.callbacks.Callback):
    """What a user's callback sees: batch hooks, epoch logs and the optimizer's step count."""

    def __init__(self):
        super().__init__()
        self.epochs, self.batch_ends, self.begin_weights = [], 0, None

    def on_train_begin(self, logs=None):
        self.begin_weights = [w.tolist() for w in self.model.get_weights()]
        self.begin_iterations = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"epoch": epoch, "iterations": int(self.model.optimizer.iterations.numpy()),
                            "batch_ends": self.batch_ends, "logs": {k: float(v) for k, v in logs.items()},
                            "weights": [w.tolist() for w in self.model.get_weights()]})
        self.batch_ends = 0


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


result = {}
if sys.argv[2:] == ["upstream"]:  # run with the fix disabled: how stock Keras 3 fails on both kinds of input
    with strategy.scope():
        model = keras.Sequential([keras.layers.Dense(2)])
        model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(32)
    for name, data in (("dataset", train), ("function", dataset_fn)):
        try:
            model.fit(data, epochs=1, steps_per_epoch=2)
            result[name] = "trained"
        except ValueError as err:
            result[name] = str(err)
    with open(out_path, "w") as f:
        json.dump(result, f)
    sys.exit(0)

# 0. The tutorial's Keras model.fit cell (Keras 3: dataset_fn itself instead of DatasetCreator,
#    keras.optimizers.SGD instead of the removed legacy one, and a ".keras" checkpoint path).


def tutorial_dataset_fn(input_context):
    global_batch_size = 64
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    x = tf.random.uniform((10, 10))
    y = tf.random.uniform((10, 1))  # Keras 3 does not broadcast a (batch,) target against (batch, 10)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10).repeat()
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    dataset = dataset.batch(batch_size)
    dataset = dataset.prefetch(2)
    return dataset


with strategy.scope():
    model = keras.models.Sequential([keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(), loss="mse", steps_per_execution=10)
working_dir = os.path.join(work, "my_working_dir")
log_dir = os.path.join(working_dir, "log")
ckpt_filepath = os.path.join(working_dir, "ckpt.keras")
callbacks = [
    keras.callbacks.TensorBoard(log_dir=log_dir),
    keras.callbacks.ModelCheckpoint(filepath=ckpt_filepath),
    keras.callbacks.BackupAndRestore(backup_dir=os.path.join(working_dir, "backup")),
]
history = model.fit(tutorial_dataset_fn, epochs=5, steps_per_epoch=20, callbacks=callbacks)
saved = keras.models.load_model(ckpt_filepath)
result["tutorial"] = {
    "loss": [float(v) for v in history.history["loss"]],
    "iterations": int(model.optimizer.iterations.numpy()),
    "checkpoint_equal": all(np.allclose(a, b) for a, b in zip(saved.get_weights(), model.get_weights())),
    "log_dir": sorted(os.listdir(log_dir)),
    "working_dir": sorted(os.listdir(working_dir)),
}
# 1. A tf.data.Dataset (each worker gets its own copy), validation, evaluate.
train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=1).repeat().batch(32)
val = tf.data.Dataset.from_tensor_slices((x[:96], y[:96])).batch(32)
model = make_model()
record = Record()
history = model.fit(train, epochs=EPOCHS, steps_per_epoch=STEPS, validation_data=val, callbacks=[record])
result["dataset"] = {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
                     "epochs": [{k: v for k, v in e.items() if k != "weights"} for e in record.epochs],
                     "evaluate": model.evaluate(val, return_dict=True),
                     "evaluate_list": model.evaluate(val),
                     "weights_on": sorted({v.device for v in model.weights[0].value.variables}
                                          if hasattr(model.weights[0].value, "variables")
                                          else {model.weights[0].value.device})}

# 2. A function of an InputContext with Keras's BackupAndRestore: interrupted at epoch 2, resumed.
backup_dir = os.path.join(work, "backup")
first = Record()
model = make_model()
try:
    model.fit(dataset_fn, epochs=EPOCHS, steps_per_epoch=STEPS,
              callbacks=[keras.callbacks.BackupAndRestore(backup_dir), first, Interrupt()])
except RuntimeError as err:
    result["interrupted"] = str(err)
result["backup_files"] = sorted(os.listdir(backup_dir))
second = Record()
model = make_model()  # fresh variables: everything must come from the backup
history = model.fit(dataset_fn, epochs=EPOCHS, steps_per_epoch=STEPS,
                    callbacks=[keras.callbacks.BackupAndRestore(backup_dir), second])
result["resume"] = {
    "first_epochs": [e["epoch"] for e in first.epochs],
    "second_epochs": [e["epoch"] for e in second.epochs],
    "restored_equal_saved": all(np.allclose(a, b) for a, b in zip(second.begin_weights, first.epochs[-1]["weights"])),
    "begin_iterations": second.begin_iterations,
    "iterations": [e["iterations"] for e in second.epochs],
    "loss": [first.epochs[0]["logs"]["loss"]] + [e["logs"]["loss"] for e in second.epochs],
    "backup_dir_left": os.path.exists(backup_dir),
}

# 2b. BackupAndRestore every 4 steps, keeping the previous backup too: the backup taken in
#     epoch 2 resumes at that epoch's start (Keras 3 repeats a partly done epoch).
backup_dir = os.path.join(work, "backup_steps")
first, second = Record(), Record()
model = make_model()
try:
    model.fit(train, epochs=EPOCHS, steps_per_epoch=STEPS,
              callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq=4, double_checkpoint=True),
                         first, Interrupt()])
except RuntimeError:
    pass
files = sorted(os.listdir(backup_dir))
with open(os.path.join(backup_dir, "training_metadata.json")) as f:
    metadata = json.load(f)
model = make_model()
model.fit(train, epochs=EPOCHS, steps_per_epoch=STEPS, callbacks=[
    keras.callbacks.BackupAndRestore(backup_dir, save_freq=4, double_checkpoint=True, delete_checkpoint=False),
    second])
result["resume_steps"] = {"files": files, "metadata": metadata, "second_epochs": [e["epoch"] for e in second.epochs],
                          "iterations": [e["iterations"] for e in second.epochs],
                          "kept": sorted(os.listdir(backup_dir))}

# 2c. A model with its own train_step and test_step (Keras's "customizing fit" pattern).
class CustomStep(keras.Model):
    def update(self, loss, y_batch, y_pred):
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y_batch, y_pred)
        return self.get_metrics_result()

    def train_step(self, data):
        x_batch, y_batch = data
        with tf.GradientTape() as tape:
            y_pred = self(x_batch, training=True)
            loss = self.compute_loss(y=y_batch, y_pred=y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return self.update(loss, y_batch, y_pred)

    def test_step(self, data):
        x_batch, y_batch = data
        y_pred = self(x_batch, training=False)
        loss = self.compute_loss(y=y_batch, y_pred=y_pred)
        return self.update(loss, y_batch, y_pred)


with strategy.scope():
    inputs = keras.Input((8,))
    model = CustomStep(inputs, keras.layers.Dense(2)(keras.layers.Dense(16, activation="relu")(inputs)))
    model.compile(keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
before = model.evaluate(val, return_dict=True, verbose=0)
history = model.fit(train, epochs=3, steps_per_epoch=STEPS, verbose=0)
after = model.evaluate(val, return_dict=True, verbose=0)
result["custom_step"] = {"before": before, "after": after, "iterations": int(model.optimizer.iterations.numpy()),
                         "history_keys": sorted(history.history)}

# 3. Mistakes get one sentence.
errors = {}
for name, call in {
    "no_steps": lambda: model.fit(train, epochs=1),
    "arrays": lambda: model.fit(x, y, epochs=1, steps_per_epoch=2),
}.items():
    try:
        call()
    except ValueError as err:
        errors[name] = str(err)
result["errors"] = errors

with open(out_path + ".tmp", "w") as f:
    json.dump(result, f)
os.replace(out_path + ".tmp", out_path)
print("DONE", flush=True)
