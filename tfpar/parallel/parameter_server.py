"""Asynchronous training with parameter servers: servers, strategy, partitioned weights.

Keras 3's ``fit`` does not run under ``ParameterServerStrategy``
(keras-team/keras#18624, DESIGN.md item 4); ``tfpar.kerasfix.ps_fit`` supplies that
path and ``tfpar.compat`` routes ``model.fit``/``evaluate`` to it. This
module holds what is specific to a parameter-server cluster:

* every worker and parameter server is its own process blocked in
  ``serve()``; servers started in the coordinator's process hang
  (DESIGN.md item 14);
* ``create()`` gives the chief its strategy and ``ClusterCoordinator``;
* weights larger than ``min_shard_bytes`` are partitioned over the ps tasks
  (``tfpar.kerasfix.ps_variables`` and the step builder let Keras 3 train
  them; a lost ps task is one clear error there);
* ``checkpoints()`` saves and restores partitioned weights (in the
  backup layout of ``tfpar.core.backup_store``).

``tfpar-train --strategy=parameter_server`` is the run hook
``tfpar.run.hooks.parameter_server``: plain Keras ``compile``/``fit`` under the strategy.
"""

import logging

from tfpar.core import backup_store
from tfpar.kerasfix import ps_variables
from tfpar.runtime import server

log = logging.getLogger("tfpar")

SERVING_TASKS = server.SERVING_TASKS
_LEGACY_EPOCH = "epoch/.ATTRIBUTES/VARIABLE_VALUE"  # the epoch in a checkpoint written before issue 26


def serve(cluster_info=None, start_only=False):
    """Run this worker or ps task's server (``tfpar.runtime.server.serve``, workers with a few inter-op threads)
    and block forever; ``start_only=True`` returns the started server instead."""
    return server.serve(cluster_info, worker_threads=True, print_fn=log.info, start_only=start_only)


def create(cluster_info=None, num_ps_shards=None, min_shard_bytes=None):
    """``(strategy, coordinator)`` for the chief of a parameter-server cluster."""
    import tensorflow as tf

    from tfpar.runtime import cluster as cluster_lib
    from tfpar.runtime import strategies

    info = cluster_info or cluster_lib.detect()
    if info.task_type != "chief" or not info.num_ps:
        raise ValueError(
            "parameter_server training runs on the 'chief' of a TF_CONFIG cluster with 'ps' and 'worker' "
            f"tasks; this task is {info.task_name!r} with {info.num_ps} ps task(s)."
        )
    strategy = strategies.create("parameter_server", cluster=info, num_ps_shards=num_ps_shards,
                                 min_shard_bytes=min_shard_bytes)
    return strategy, tf.distribute.coordinator.ClusterCoordinator(strategy)


def variable_placement(model):
    """``{variable path: [device, ...]}``: one device per shard of each weight."""
    return {weight.path: [v.device for v in ps_variables.shards(weight)] for weight in model.weights}


def _checkpoint_variables(model):
    """``{path: tf.Variable or ShardedVariable}`` for the model and optimizer.

    Checkpointing the Keras objects fails for partitioned weights (the
    saver asks a ``ShardedVariable`` for its ``device``); the TF variables
    underneath save and restore fine, shards included.
    """
    found = {}
    for prefix, weights in (("model", model.weights), ("optimizer", model.optimizer.variables)):
        for weight in weights:
            key = f"{prefix}/{weight.path}"
            while key in found:
                key += "_"
            found[key] = getattr(weight, "value", weight)
    return found


def checkpoints(directory, keep=3):
    """A Keras callback: the chief's checkpoints of model, optimizer and epoch in ``directory``.

    Unlike ``keras.callbacks.BackupAndRestore`` (an HDF5 file of the Keras
    weights), it saves the TF variables underneath, so weights partitioned
    over several ps tasks save and restore too. Each epoch end writes one
    backup in ``tfpar.core.backup_store``'s layout (``step-N/`` with
    ``ckpt.*`` and ``backup.json``, which records the epoch), keeping the
    newest ``keep``. ``on_train_begin`` restores the latest one and sets the
    epoch ``fit`` resumes at; the optimizer's ``iterations`` (the finished-step
    count, exact at epoch ends) comes back with it. A backup of a model with
    other weights is refused in one sentence. A ``tf.train.CheckpointManager``
    checkpoint that tfpar wrote here before issue 26 still resumes.
    """
    import keras
    import tensorflow as tf

    from tfpar.runtime import backup

    class Checkpoints(keras.callbacks.Callback):
        initial_epoch = 0  # the epoch this run resumed at
        epoch = 0  # epochs done (restored or trained)

        def on_train_begin(self, logs=None):
            backup.build_optimizer(self.model)  # its slots are variables to restore too
            self.checkpoint = tf.train.Checkpoint(variables=_checkpoint_variables(self.model))
            self.signature = {"weights": backup_store.weights_signature(self.model)}
            found = backup_store.latest(directory)
            if found is not None:
                backup_store.refuse_foreign(directory, found.signature, self.signature)
                prefix, self.epoch = found.checkpoint_prefix, found.epoch
            else:
                prefix = tf.train.latest_checkpoint(directory)  # tfpar's layout before issue 26
                if prefix:
                    self.epoch = int(tf.train.load_checkpoint(prefix).get_tensor(_LEGACY_EPOCH))
            if prefix:
                backup.read_checkpoint(self.checkpoint, prefix, directory)
                self.model._initial_epoch = self.initial_epoch = self.epoch
                log.info("resumed from %s (epoch %d, %d steps)", prefix, self.epoch,
                         int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))

        def on_epoch_end(self, epoch, logs=None):
            self.epoch = epoch + 1
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            backup_store.write(directory, self.checkpoint.write, step=step, epoch=self.epoch,
                               signature=self.signature, max_to_keep=keep)

        def resume_hint(self):
            if not self.epoch:
                return f"no checkpoint in {directory} yet, so the chief starts from scratch"
            return f"the chief resumes from the latest checkpoint in {directory} (epoch {self.epoch})"

    return Checkpoints()
