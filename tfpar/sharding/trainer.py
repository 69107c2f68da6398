"""Sharded training of a Keras 3 model on a DTensor mesh, with Keras callbacks.

``ShardedTrainer`` builds the model and optimizer inside ``layout_scope`` so
every weight and optimizer slot is a DTensor variable with its rule's layout,
splits each batch over the mesh's first (data) axis and trains with compiled
steps. ``fit``/``evaluate``/``train_on_batch`` take the arguments and
callbacks ``keras.Model`` takes; ``fit`` returns a ``keras.callbacks.History``.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.sharding import variables as var_lib


def _loss_fn(loss):
    """A function returning per-example losses (so padded batches can be masked)."""
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    fn = keras.losses.get(loss)
    return fn.call if isinstance(fn, keras.losses.Loss) else fn


class ShardedTrainer:
    """Train ``model_builder()`` with weights laid out on ``mesh`` by ``rules``.

    Args:
      model_builder: a function returning a built ``keras.Model`` (e.g.
        ``lambda: tfpar.models.build("vgg16", ...)``); it runs inside the
        layout scope, after the global dtype policy is set.
      mesh: a ``dtensor.Mesh`` (see ``tfpar.sharding.mesh``).
      rules: layout rules (see ``tfpar.sharding.rules``); ``None`` replicates
        every weight (pure data parallelism over the whole mesh's first axis).
      optimizer: a Keras optimizer name or a function returning one. Not an
        instance: its variables must be created inside the layout scope.
      loss: a Keras loss name, function or ``Loss`` (labels are class ids).
      batch_axis: the mesh axis batches are split over (default: the first).
    """

    def __init__(self, model_builder, mesh, rules=None, optimizer="sgd",
                 loss="sparse_categorical_crossentropy", batch_axis=None):
        if isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "Pass the optimizer as a name or a function that creates it, not an instance, "
                "so its variables are created as DTensor variables."
            )
        self.mesh = mesh
        self.batch_axis = batch_axis or mesh.dim_names[0]
        if self.batch_axis not in mesh.dim_names:
            raise ValueError(f"batch_axis {self.batch_axis!r} is not a mesh axis; the mesh has {', '.join(mesh.dim_names)}.")
        self._loss = _loss_fn(loss)
        with var_lib.layout_scope(mesh, rules) as self.layouts:
            self.model = model_builder()
            made = optimizer() if callable(optimizer) else keras.optimizers.get(optimizer)
            # compile wraps the optimizer in LossScaleOptimizer under mixed_float16, as Keras does.
            self.model.compile(optimizer=made, loss=loss)
            self.optimizer = self.model.optimizer
            self.optimizer.build(self.model.trainable_variables)
        var_lib.adapt_layers(self.model, self.layouts)
        self._iterator = None
        self._compile_steps()

    # ----- compiled steps -------------------------------------------------
    def _compile_steps(self):
        model, optimizer, loss_fn = self.model, self.optimizer, self._loss

        def metrics(y, pred):
            per_example = tf.cast(loss_fn(y, pred), tf.float32)
            hit = tf.cast(tf.equal(tf.cast(tf.argmax(pred, axis=-1), y.dtype), y), tf.float32)
            return per_example, hit

        def regularization():
            return tf.add_n([tf.cast(l, tf.float32) for l in model.losses]) if model.losses else 0.0

        @tf.function
        def gradients(x, y):
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                per_example, hit = metrics(y, pred)
                loss = tf.reduce_mean(per_example) + regularization()
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            return loss, tf.reduce_mean(hit), grads

        # The update runs as its own function: in one function with the
        # gradients, DTensor (TF 2.21) let SGD-momentum read its slot before
        # writing it, so every step applied the previous step's update.
        @tf.function
        def apply(grads):
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        @tf.function
        def evaluate(x, y, weight):
            pred = model(x, training=False)
            per_example, hit = metrics(y, pred)
            return tf.reduce_sum(per_example * weight), tf.reduce_sum(hit * weight), regularization()

        self._gradients, self._apply, self._evaluate = gradients, apply, evaluate

    # ----- data -----------------------------------------------------------
    def shard_batch(self, array):
        """A host batch as a DTensor split along ``batch_axis`` (each client packs its own devices)."""
        array = np.asarray(array)
        parts = self.mesh.dim_size(self.batch_axis)
        if len(array) % parts:
            raise ValueError(
                f"Batch of {len(array)} does not divide evenly over mesh axis {self.batch_axis!r} "
                f"of size {parts}; use a multiple of {parts}."
            )
        size = len(array) // parts
        layout = dtensor.Layout.batch_sharded(self.mesh, self.batch_axis, array.ndim)
        pieces = [array[loc[self.batch_axis] * size:(loc[self.batch_axis] + 1) * size]
                  for loc in self.mesh.local_device_locations()]
        return dtensor.pack([tf.constant(p) for p in pieces], layout)

    @staticmethod
    def _host(batch):
        x, y = batch[0], batch[1]
        return np.asarray(x), np.asarray(y)

    # ----- Keras-like API -------------------------------------------------
    def train_on_batch(self, x, y):
        """One step on one global batch; returns ``{"loss", "accuracy"}`` of that batch before the update."""
        loss, accuracy, grads = self._gradients(self.shard_batch(x), self.shard_batch(y))
        self._apply(grads)
        return {"loss": _scalar(loss), "accuracy": _scalar(accuracy)}

    def fit(self, dataset, epochs=1, steps_per_epoch=None, callbacks=None, validation_data=None,
            validation_steps=None, verbose=1, initial_epoch=0):
        """Train like ``keras.Model.fit`` on a dataset of ``(x, y)`` global batches; returns ``History``."""
        cbs = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=verbose != 0, model=self.model,
            verbose=verbose, epochs=epochs, steps=steps_per_epoch,
        )
        self.model.stop_training = False
        cbs.on_train_begin()
        logs = {}
        for epoch in range(initial_epoch, epochs):
            cbs.on_epoch_begin(epoch)
            totals, step = {"loss": 0.0, "accuracy": 0.0}, 0
            for x, y in self._epoch_batches(dataset, steps_per_epoch):
                cbs.on_train_batch_begin(step)
                result = self.train_on_batch(x, y)
                step += 1
                for key in totals:
                    totals[key] += result[key]
                cbs.on_train_batch_end(step - 1, {k: v / step for k, v in totals.items()})
                if self.model.stop_training:
                    break
            if step == 0:
                raise ValueError("The training data gave no batches; check the dataset and steps_per_epoch.")
            logs = {k: v / step for k, v in totals.items()}
            if validation_data is not None:
                val = self.evaluate(validation_data, steps=validation_steps, verbose=0)
                logs.update({f"val_{k}": v for k, v in val.items()})
            cbs.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
        cbs.on_train_end(logs)
        return cbs._history

    def _epoch_batches(self, dataset, steps):
        if steps is None:
            for batch in dataset:
                yield self._host(batch)
            return
        for _ in range(steps):
            if self._iterator is None or self._iterator[0] is not dataset:
                self._iterator = (dataset, iter(dataset))
            try:
                batch = next(self._iterator[1])
            except StopIteration:
                self._iterator = (dataset, iter(dataset))
                batch = next(self._iterator[1])
            yield self._host(batch)

    def evaluate(self, dataset, steps=None, verbose=0, return_dict=True):
        """Mean loss (with regularization) and accuracy over ``dataset``; a short last batch is padded and masked."""
        loss_sum = hit_sum = count = 0.0
        reg = 0.0
        batch_size = None
        for i, batch in enumerate(dataset):
            if steps is not None and i >= steps:
                break
            x, y = self._host(batch)
            n = len(x)
            batch_size = batch_size or _padded_size(n, self.mesh.dim_size(self.batch_axis))
            weight = np.zeros(batch_size, np.float32)
            weight[:n] = 1.0
            if n < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
                y = np.concatenate([y, np.zeros((batch_size - n,) + y.shape[1:], y.dtype)])
            lsum, hsum, reg = self._evaluate(self.shard_batch(x), self.shard_batch(y), self.shard_batch(weight))
            loss_sum += _scalar(lsum)
            hit_sum += _scalar(hsum)
            count += n
        if not count:
            raise ValueError("The evaluation data gave no batches.")
        result = {"loss": loss_sum / count + _scalar(reg), "accuracy": hit_sum / count}
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in result.items()))
        return result if return_dict else [result["loss"], result["accuracy"]]

    # ----- weights and checkpoints ----------------------------------------
    def get_weights(self):
        """Full host values of the model's weights, in ``model.weights`` order."""
        return [var_lib.host_value(v) for v in self.model.weights]

    def set_weights(self, arrays):
        """Assign full host values to the model's weights, each keeping its layout."""
        weights = self.model.weights
        if len(arrays) != len(weights):
            raise ValueError(f"set_weights got {len(arrays)} arrays for {len(weights)} weights.")
        for variable, array in zip(weights, arrays):
            var_lib.assign(variable, array, self.layouts)

    def _checkpoint(self):
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)

    def save(self, directory):
        """Write model and optimizer state to ``directory`` atomically (temporary folder, then rename)."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
        try:
            self._checkpoint().write(os.path.join(tmp, "ckpt"))
            old = None
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=".old-ckpt-", dir=parent)
                os.rename(directory, os.path.join(old, "ckpt"))
            os.rename(tmp, directory)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def restore(self, directory):
        """Restore state written by ``save`` into the existing variables (their layouts are kept)."""
        prefix = os.path.join(directory, "ckpt")
        if not os.path.exists(prefix + ".index"):
            raise ValueError(f"No sharded checkpoint in {directory!r} (expected {prefix}.index).")
        self._checkpoint().read(prefix).assert_existing_objects_matched()
        return self


def _padded_size(n, parts):
    return -(-n // parts) * parts


def _scalar(tensor):
    if dtensor.is_dtensor(tensor):
        tensor = dtensor.unpack(tensor)[0]
    return float(np.asarray(tensor))
