"""``ShardedTrainer``: the factory-style API from before ``layout_scope`` trained plain Keras.

It builds and compiles the model inside ``layout_scope``; ``fit``,
``evaluate``, ``train_on_batch`` and the weights are the model's own (Keras
``fit`` on DTensor, see ``keras_steps``). New code can skip it:

    with sharding.layout_scope(mesh, rules):
        model = build(); model.compile(optimizer, loss, metrics)
    model.fit(...)

What it adds is ``save``/``restore`` of a sharded TF checkpoint (model and
optimizer state, read back into the same layouts), written in the backup
layout every tfpar checkpoint uses (``tfpar.core.backup_store``).
"""

import os

import keras
import tensorflow as tf

from tfpar.core import backup_store
from tfpar.runtime import backup
from tfpar.parallel.sharding import variables as var_lib
from tfpar.parallel.sharding.layers import adapt_layers


class ShardedTrainer:
    """Build ``model_builder()`` in ``layout_scope(mesh, rules)`` and compile it.

    Args:
      model_builder: a function returning a ``keras.Model``; it runs inside
        the layout scope, after the global dtype policy is set.
      mesh: a ``dtensor.Mesh`` (see ``tfpar.sharding.mesh``).
      rules: layout rules or a ``keras.distribution.LayoutMap``; ``None``
        replicates every weight (pure data parallelism over the first axis).
      optimizer: a Keras optimizer name or a function returning one (not an
        instance made outside: its variables must be DTensor variables).
      loss: a Keras loss (labels are class ids); accuracy is the metric.
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
        with var_lib.layout_scope(mesh, rules, batch_axis=batch_axis) as self.layouts:
            self.model = model_builder()
            made = optimizer() if callable(optimizer) else keras.optimizers.get(optimizer)
            # compile wraps the optimizer in LossScaleOptimizer under mixed_float16, as Keras does.
            self.model.compile(optimizer=made, loss=loss,
                               metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
            self.optimizer = self.model.optimizer
            self.optimizer.build(self.model.trainable_variables)
        adapt_layers(self.model, self.layouts)

    def train_on_batch(self, x, y):
        """One step on one global batch; ``{"loss", "accuracy"}`` of that batch before the update."""
        return self.model.train_on_batch(x, y, return_dict=True)

    def fit(self, *args, **kwargs):
        return self.model.fit(*args, **kwargs)

    def evaluate(self, dataset, steps=None, verbose=0, return_dict=True):
        return self.model.evaluate(dataset, steps=steps, verbose=verbose, return_dict=return_dict)

    def get_weights(self):
        return self.model.get_weights()

    def set_weights(self, arrays):
        self.model.set_weights(arrays)

    def _checkpoint(self):
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)

    def save(self, directory, keep=1):
        """Write model and optimizer state to ``directory`` as one backup of ``tfpar.core.backup_store``
        (``step-N/`` with ``ckpt.*`` and ``backup.json``, renamed into place whole); keep the newest ``keep``."""
        step = int(var_lib.host_value(self.optimizer.iterations))
        backup_store.write(directory, self._checkpoint().write, step=step,
                           signature={"weights": backup_store.weights_signature(self.model)}, max_to_keep=keep)
        return directory

    def restore(self, directory):
        """Restore state written by ``save`` into the existing variables (their layouts are kept).

        ``directory`` is what ``save`` was given, one ``step-N`` backup in it,
        or a checkpoint tfpar wrote before issue 26 (``directory/ckpt.*``).
        """
        found = backup_store.read(directory) if os.path.exists(os.path.join(directory, backup_store.METADATA)) \
            else backup_store.latest(directory)
        if isinstance(found, str):
            raise ValueError(f"The sharded checkpoint {directory!r} is unusable ({found}).")
        if found is not None:
            backup_store.refuse_foreign(directory, found.signature,
                                        {"weights": backup_store.weights_signature(self.model)})
            prefix = found.checkpoint_prefix
        else:
            prefix = os.path.join(directory, backup_store.CKPT)  # the layout before issue 26
            if not os.path.exists(prefix + ".index"):
                raise ValueError(f"No sharded checkpoint in {directory!r} (expected {backup_store.PREFIX}*/ "
                                 f"with {backup_store.METADATA}).")
        backup.read_checkpoint(self._checkpoint(), prefix, directory)
        return self
