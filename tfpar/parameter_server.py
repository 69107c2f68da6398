"""Asynchronous training with parameter servers: servers, strategy, partitioned weights.

Keras 3's ``fit`` does not run under ``ParameterServerStrategy``
(keras-team/keras#18624, DESIGN.md item 4); ``tfpar.ps_fit`` supplies that
path and ``tfpar.compat`` routes ``model.fit``/``evaluate`` to it. This
module holds what is specific to a parameter-server cluster:

* every worker and parameter server is its own process blocked in
  ``serve()``; servers started in the coordinator's process hang
  (DESIGN.md item 14);
* ``create()`` gives the chief its strategy and ``ClusterCoordinator``;
* weights larger than ``min_shard_bytes`` are partitioned over the ps tasks,
  and ``_gradients``/``_support_sharded_variables`` let Keras 3 train them;
* ``checkpoints()`` saves and restores partitioned weights, and
  ``lost_ps_error`` turns a lost ps task into one clear error;
* ``run_config`` is ``tfpar-train --strategy=parameter_server``: plain
  Keras ``compile``/``fit`` under the strategy.
"""

import logging
import os
import time

import numpy as np

log = logging.getLogger("tfpar")

SERVING_TASKS = ("worker", "ps")


class ParameterServerError(RuntimeError):
    """A parameter server was lost; the variables it held are gone."""


def serve(cluster_info=None, start_only=False):
    """Run this worker or ps task's ``tf.distribute.Server`` and block forever.

    ``cluster_info`` defaults to ``tfpar.cluster.detect()`` (``TF_CONFIG``).
    ``start_only=True`` returns the started server instead of joining it.
    """
    from tfpar import cluster as cluster_lib

    info = cluster_info or cluster_lib.detect()
    if info.task_type not in SERVING_TASKS or not info.cluster_spec:
        raise ValueError(
            f"serve() is for 'worker' and 'ps' tasks of a TF_CONFIG cluster; this task is {info.task_name!r}."
        )
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto()
    if info.task_type == "worker":
        # Each worker runs one step at a time; a few inter-op threads keep its
        # variable reads and writes to the PS tasks flowing concurrently.
        config.inter_op_parallelism_threads = max(2, len(info.cluster_spec.get("worker", [])))
    server = tf.distribute.Server(
        tf.train.ClusterSpec(info.cluster_spec), job_name=info.task_type, task_index=info.task_index,
        protocol="grpc", config=config, start=True,
    )
    log.info("%s serving at %s", info.task_name, server.target)
    if start_only:
        return server
    server.join()


def create(cluster_info=None, num_ps_shards=None, min_shard_bytes=None):
    """``(strategy, coordinator)`` for the chief of a parameter-server cluster."""
    import tensorflow as tf

    from tfpar import cluster as cluster_lib
    from tfpar import strategies

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
    return {weight.path: [v.device for v in _shards(weight)] for weight in model.weights}


def _shards(weight):
    """The ``tf.Variable`` pieces of a Keras weight: its shards when partitioned."""
    import tensorflow as tf

    value = getattr(weight, "value", weight)
    if isinstance(value, tf.__internal__.distribute.ShardedVariable):
        return list(value.variables)
    return [value]


def _gradients(tape, loss, weights):
    """Gradients per Keras weight, for partitioned weights too.

    ``tape.gradient`` on a Keras weight asks for ``value.handle``, which a
    ``ShardedVariable`` lacks; so differentiate with respect to the shards
    and concatenate (variables are partitioned along axis 0).
    """
    import tensorflow as tf

    pieces = [_shards(w) for w in weights]
    flat = tape.gradient(loss, [v for shards in pieces for v in shards])
    grads, at = [], 0
    for shards in pieces:
        part = flat[at:at + len(shards)]
        at += len(shards)
        if len(part) == 1:
            grads.append(part[0])
        elif any(g is None for g in part):
            grads.append(None)
        else:
            grads.append(tf.concat([tf.convert_to_tensor(g) for g in part], axis=0))
    return grads


def _support_sharded_variables(optimizer):
    """Let this Keras 3 optimizer update ``ShardedVariable`` weights.

    Keras's TF optimizer sends every update through
    ``strategy.extended.update``, which takes only plain resource variables
    ("You can not update `var`"). Under ParameterServerStrategy each worker
    step is a single replica, so a sharded weight can be updated in place:
    ``ShardedVariable.assign*`` split the new value over the shards. Plain
    variables keep Keras's path (the update runs on their PS task). Only this
    optimizer instance changes; calling this twice is harmless.
    """
    import tensorflow as tf

    sharded_type = tf.__internal__.distribute.ShardedVariable
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None or getattr(opt, "_tfpar_sharded_updates", False):
            continue
        keras_update = opt._distributed_tf_update_step
        keras_decay = opt._apply_weight_decay

        def update(distribution, grads_and_vars, learning_rate, opt=opt, keras_update=keras_update):
            plain = []
            for grad, var in grads_and_vars:
                if isinstance(var, sharded_type):
                    opt.update_step(grad, var, learning_rate)
                else:
                    plain.append((grad, var))
            keras_update(distribution, plain, learning_rate)

        def decay(variables, opt=opt, keras_decay=keras_decay):
            plain = []
            for variable in variables:
                value = getattr(variable, "value", variable)
                if isinstance(value, sharded_type):
                    if opt.weight_decay is not None and opt._use_weight_decay(variable):
                        rate = tf.cast(opt.learning_rate, value.dtype) * tf.cast(opt.weight_decay, value.dtype)
                        value.assign_sub(tf.convert_to_tensor(value) * rate)
                else:
                    plain.append(variable)
            keras_decay(plain)

        opt._distributed_tf_update_step = update
        opt._apply_weight_decay = decay
        opt._tfpar_sharded_updates = True


def _is_ps_failure(err):
    """Worker losses are retried by the coordinator; an unavailable task that reaches us is a PS."""
    import tensorflow as tf

    return isinstance(err, tf.errors.UnavailableError) or "/job:ps" in str(err)


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
    """A Keras callback: chief-only checkpoints of model, optimizer and epoch in ``directory``.

    Unlike ``keras.callbacks.BackupAndRestore`` (an HDF5 file of the Keras
    weights), it saves the TF variables underneath, so weights partitioned
    over several ps tasks save and restore too. ``on_train_begin`` restores the
    latest checkpoint and sets the epoch ``fit`` resumes at; the optimizer's
    ``iterations`` (the finished-step count, exact at epoch ends) comes back with it.
    """
    import keras
    import tensorflow as tf

    class Checkpoints(keras.callbacks.Callback):
        initial_epoch = 0  # the epoch this run resumed at

        def on_train_begin(self, logs=None):
            # A plain variable on the chief: the epoch a restarted run resumes at.
            with tf.device("/job:chief/replica:0/task:0/device:CPU:0"):
                self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            checkpoint = tf.train.Checkpoint(variables=_checkpoint_variables(self.model), epoch=self.epoch)
            self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
            if self.manager.latest_checkpoint:
                checkpoint.restore(self.manager.latest_checkpoint).expect_partial()
                self.model._initial_epoch = self.initial_epoch = int(self.epoch.numpy())
                log.info("resumed from %s (epoch %d, %d steps)", self.manager.latest_checkpoint,
                         int(self.epoch.numpy()), int(self.model.optimizer.iterations.numpy()))

        def on_epoch_end(self, epoch, logs=None):
            self.epoch.assign(epoch + 1)
            self.manager.save(checkpoint_number=epoch + 1)

        def resume_hint(self):
            saved = int(self.epoch.numpy())
            if not saved:
                return f"no checkpoint in {directory} yet, so the chief starts from scratch"
            return f"the chief resumes from the latest checkpoint in {directory} (epoch {saved})"

    return Checkpoints()


def epoch_printer(print_fn, epochs):
    """A callback printing ``epoch N/E: loss=... steps=...`` after each epoch (tfpar-train's line)."""
    import keras

    class EpochPrinter(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
            print_fn(f"epoch {epoch + 1}/{epochs}: {shown} steps={steps} "
                     f"({time.perf_counter() - self._started:.1f}s)")

    return EpochPrinter()


def lost_ps_error(err, strategy, epoch, finished_steps, resume):
    """A ``ParameterServerError`` that names the lost task; ``resume`` says where a restart resumes."""
    text = str(err)
    resolver = strategy.cluster_resolver or getattr(strategy, "_cluster_resolver", None)
    addresses = resolver.cluster_spec().as_dict().get("ps", []) if resolver else []
    lost = [f"ps:{i} ({a})" for i, a in enumerate(addresses) if a in text or f"/job:ps/replica:0/task:{i}" in text]
    who = ", ".join(lost) or "a parameter server"
    return ParameterServerError(
        f"Lost {who} during epoch {epoch + 1} after {finished_steps} finished steps "
        f"({type(err).__name__}); its variables are gone, so training stopped. Restart the ps task(s) "
        f"and the chief (workers may stay up): {resume}."
    )


def run_config(config, cluster_info, print_fn=print, num_ps_shards=None, min_shard_bytes=None):
    """``tfpar.train``'s training loop for ``strategy='parameter_server'``.

    Worker and ps tasks block in ``serve()``. The chief compiles the model
    under the strategy and trains it with Keras's own ``model.fit``, which
    ``tfpar.compat`` runs through the coordinator (``tfpar.ps_fit``): one
    asynchronous loop for tfpar-train and for users' Keras code. It returns
    the loop fields ``tfpar.train.run`` expects (strategy, replicas,
    precision, epochs_done, steps_done, losses, accuracies,
    examples_per_sec, weights_sha256) plus ``num_ps``, ``initial_epoch``,
    ``loss_history`` and ``variable_placement``; ``run`` adds config,
    versions, task and wall time and writes ``summary.json``.
    ``num_ps_shards``/``min_shard_bytes`` partition large variables (default:
    one shard per ps task for weights over 256 KiB).
    """
    if cluster_info.task_type in SERVING_TASKS:
        serve(cluster_info)
        return None
    if config.grad_accum_steps > 1:
        raise ValueError("parameter_server training runs one batch per step; use grad_accum_steps=1.")
    from tfpar import data

    source = data.inspect(config.data, config.num_classes, config.seed)

    import keras

    from tfpar import compat, precision, ps_fit, strategies, summary
    from tfpar import train as train_lib

    strategy, _ = create(cluster_info, num_ps_shards, min_shard_bytes)
    if compat.PS_FIT not in compat.applied() and compat.ps_fit_needed():
        raise ValueError(f"Keras fit cannot train under ParameterServerStrategy while the compat fix {compat.PS_FIT} "
                         f"is disabled ({compat.DISABLE_ENV}); remove it from {compat.DISABLE_ENV}.")
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)
    batch = config.global_batch_size(1)  # one step is one batch on one worker
    pipes = data.make(config, batch, source)
    with strategy.scope():
        model = train_lib.build_model(config)
        optimizer, peak = train_lib.make_optimizer(config, batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=train_lib.make_loss(config),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      steps_per_execution=config.steps_per_execution)
    val = pipes.val.take(pipes.validation_steps) if pipes.val is not None and pipes.validation_steps else pipes.val
    if print_fn:
        print_fn(f"{strategies.describe(strategy, cluster_info)}: batch {batch} per step, "
                 f"{config.steps_per_execution} step(s) per scheduled function, "
                 f"precision {policy}, peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch")

    timer = ps_fit.timed_epochs()
    saver = checkpoints(os.path.join(config.model_dir, "checkpoints"))
    callbacks = [saver, timer]
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=config.model_dir))
    if print_fn and config.verbose != 0:
        callbacks.append(epoch_printer(print_fn, config.epochs))
    history = model.fit(pipes.train, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
                        validation_data=val, callbacks=callbacks, verbose=0)
    hist = history.history
    final = model.evaluate(val, return_dict=True, verbose=0) if val is not None else {}
    steps_done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    rates = [pipes.steps_per_epoch * batch / s for s in timer.seconds if s > 0]
    epochs_run = len(hist.get("loss", []))
    return {
        "strategy": strategies.describe(strategy, cluster_info),
        "strategy_class": strategies.public_class(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "precision": policy,
        "global_batch_size": batch,
        "learning_rate_peak": peak,
        "num_ps": cluster_info.num_ps,
        "initial_epoch": saver.initial_epoch,
        "epochs_done": saver.initial_epoch + epochs_run,
        "steps_done": steps_done,
        "optimizer_updates": steps_done,
        "train_loss": float(hist["loss"][-1]) if hist.get("loss") else None,
        "train_accuracy": float(hist["accuracy"][-1]) if hist.get("accuracy") else None,
        "loss_history": [float(v) for v in hist.get("loss", [])],
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": float(np.median(rates)) if rates else None,
        "epoch_examples_per_sec": rates,
        "staleness": ps_fit.mean_staleness(model),  # updates between a gradient's weights and its own update
        "weights_sha256": summary.weights_checksum(model),
        "variable_placement": variable_placement(model),
    }
