"""Asynchronous training with parameter servers and a ``ClusterCoordinator``.

Keras 3's ``fit`` does not run under ``ParameterServerStrategy``
(keras-team/keras#18624, DESIGN.md item 4), so this module provides the loop:
the chief schedules a compiled train step on whichever worker is free, the
workers read and update variables that live on the ``ps`` tasks, and nobody
waits for anybody. Three facts shape it (DESIGN.md item 14):

* every worker and parameter server is its own process blocked in
  ``serve()``; servers started in the coordinator's process hang;
* ``optimizer.iterations`` loses increments under concurrent updates, so the
  number of finished steps is counted on the coordinator;
* per-step results are fetched and summed on the coordinator, so epoch
  metrics are exact example-weighted means however steps were interleaved
  or rescheduled after a worker failure.
"""

import dataclasses
import logging
import math
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


def sparse_accuracy(y_true, y_pred):
    """Per-example 0/1 correctness for integer labels and class scores."""
    import tensorflow as tf

    y_true = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
    return tf.cast(tf.equal(tf.argmax(y_pred, axis=-1), y_true), tf.float32)


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


def _train_step_fn(model, metric_fns):
    """The compiled step a worker runs: forward, loss, gradients, update; returns sums."""
    import tensorflow as tf

    _support_sharded_variables(model.optimizer)

    @tf.function
    def step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
                scaled = model.optimizer.scale_loss(loss)
            grads = _gradients(tape, scaled, model.trainable_weights)
            model.optimizer.apply_gradients(zip(grads, model.trainable_weights))
            count = tf.cast(tf.shape(y)[0], tf.float32)
            sums = {"loss": tf.cast(loss, tf.float32) * count, "count": count}
            for name, fn in metric_fns.items():
                sums[name] = tf.reduce_sum(tf.cast(fn(y, y_pred), tf.float32))
            return sums

        x, y = next(iterator)
        return model.distribute_strategy.run(replica_step, args=(x, y))

    return step


def _eval_fn(model, metric_fns):
    """Exact evaluation on the coordinator: reads the variables from the PS tasks."""
    import tensorflow as tf

    @tf.function
    def batch(x, y):
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        count = tf.cast(tf.shape(y)[0], tf.float32)
        sums = {"loss": tf.cast(loss, tf.float32) * count, "count": count}
        for name, fn in metric_fns.items():
            sums[name] = tf.reduce_sum(tf.cast(fn(y, y_pred), tf.float32))
        return sums

    def evaluate(dataset):
        totals = {}
        for x, y in dataset:
            for key, value in batch(x, y).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return _means(totals)

    return evaluate


def _means(totals):
    count = totals.pop("count", 0.0)
    return {k: (v / count if count else float("nan")) for k, v in totals.items()}


def _is_ps_failure(err):
    """Worker losses are retried by the coordinator; an unavailable task that reaches us is a PS."""
    import tensorflow as tf

    return isinstance(err, tf.errors.UnavailableError) or "/job:ps" in str(err)


@dataclasses.dataclass
class _Checkpointer:
    """Chief-only checkpoints of model, optimizer, epoch and finished-step count."""

    manager: object
    epoch: object
    steps: object

    def save(self, epoch, steps):
        self.epoch.assign(epoch)
        self.steps.assign(steps)
        return self.manager.save(checkpoint_number=epoch)


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


def _checkpointer(model, directory, keep=3):
    import tensorflow as tf

    # Plain variables on the chief: they say where a restarted run resumes.
    with tf.device("/job:chief/replica:0/task:0/device:CPU:0"):
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_steps")
    checkpoint = tf.train.Checkpoint(variables=_checkpoint_variables(model), epoch=epoch, finished_steps=steps)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        log.info("resumed from %s (epoch %d, %d steps)", manager.latest_checkpoint, int(epoch), int(steps))
    return _Checkpointer(manager, epoch, steps)


def fit(model, coordinator, dataset_fn, *, epochs=1, steps_per_epoch, validation_data=None,
        callbacks=None, checkpoint_dir=None, metrics=None, print_fn=print):
    """Train ``model`` asynchronously, like ``model.fit``; returns a ``keras.callbacks.History``.

    Args:
      model: a Keras 3 model built and compiled (loss, optimizer) inside the
        coordinator's ``strategy.scope()``.
      coordinator: a ``tf.distribute.coordinator.ClusterCoordinator``.
      dataset_fn: a repeated, batched ``tf.data.Dataset``, or a no-argument
        function returning one (traced once, run on every worker, where a
        seedless shuffle then differs per worker). Every worker reads its
        own copy; one step is one batch on one worker.
      epochs, steps_per_epoch: how much to train; an epoch ends when the
        coordinator has seen ``steps_per_epoch`` steps finish.
      validation_data: a finite ``tf.data.Dataset`` of ``(x, y)`` batches,
        evaluated exactly on the chief after each epoch (``val_*`` logs).
      callbacks: Keras callbacks. They see epoch-level hooks only
        (``on_train_begin/end``, ``on_epoch_begin/end``): History,
        TensorBoard scalars, EarlyStopping, CSVLogger fit; per-batch hooks do
        not run, because steps finish out of order on remote workers.
      checkpoint_dir: the chief saves model, optimizer, epoch and step count
        here after every epoch and resumes from the latest one when started
        again (after a parameter-server failure, for instance).
      metrics: ``{name: fn(y_true, y_pred) -> per-example values}`` averaged
        over examples; default ``{"accuracy": sparse_accuracy}``.
      print_fn: one line per epoch (None for silence).

    Raises:
      ParameterServerError: a parameter server was lost; restart the cluster
        and the same call resumes from ``checkpoint_dir``.
    """
    import keras
    import tensorflow as tf

    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}.")
    metric_fns = {"accuracy": sparse_accuracy} if metrics is None else dict(metrics)
    strategy = coordinator.strategy
    with strategy.scope():
        model.optimizer.build(model.trainable_weights)  # slots on the PS before any restore

    checkpointer = _checkpointer(model, checkpoint_dir) if checkpoint_dir else None
    initial_epoch = int(checkpointer.epoch.numpy()) if checkpointer else 0
    finished_steps = int(checkpointer.steps.numpy()) if checkpointer else 0

    if isinstance(dataset_fn, tf.data.Dataset):
        per_worker = dataset_fn  # serialized and rebuilt on every worker, shuffle seeds included
    else:
        def per_worker(_fn=dataset_fn):
            tf.random.set_seed(None)  # traced once, run on every worker: let each shuffle its own way
            return strategy.distribute_datasets_from_function(lambda _: _fn())
    iterator = iter(coordinator.create_per_worker_dataset(per_worker))
    step = _train_step_fn(model, metric_fns)
    evaluate = _eval_fn(model, metric_fns) if validation_data is not None else None

    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=False, model=model, epochs=epochs, steps=steps_per_epoch, verbose=0
    )
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        started = time.perf_counter()
        try:
            results = [coordinator.schedule(step, args=(iterator,)) for _ in range(steps_per_epoch)]
            coordinator.join()
            totals = {}
            for result in results:
                for key, value in result.fetch().items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        except tf.errors.OpError as err:
            if not _is_ps_failure(err):
                raise
            raise _ps_failure(err, strategy, epoch, finished_steps, checkpointer) from err
        elapsed = time.perf_counter() - started
        finished_steps += len(results)
        count = totals.get("count", 0.0)
        logs = _means(totals)
        logs["examples_per_sec"] = count / elapsed if elapsed > 0 else 0.0
        logs["finished_steps"] = finished_steps
        if evaluate is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(validation_data).items()})
        if checkpointer:
            checkpointer.save(epoch + 1, finished_steps)
        if print_fn:
            shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k not in ("finished_steps", "examples_per_sec"))
            print_fn(f"epoch {epoch + 1}/{epochs}: {shown} steps={finished_steps} "
                     f"examples/sec={logs['examples_per_sec']:.1f}")
        callback_list.on_epoch_end(epoch, logs)
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"Training diverged in epoch {epoch + 1}: {logs}.")
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    model.history.finished_steps = finished_steps
    model.history.initial_epoch = initial_epoch
    return model.history


def _ps_failure(err, strategy, epoch, finished_steps, checkpointer):
    """A ``ParameterServerError`` that names the lost task and where a restart resumes."""
    text = str(err)
    resolver = strategy.cluster_resolver or getattr(strategy, "_cluster_resolver", None)
    addresses = resolver.cluster_spec().as_dict().get("ps", []) if resolver else []
    lost = [f"ps:{i} ({a})" for i, a in enumerate(addresses) if a in text or f"/job:ps/replica:0/task:{i}" in text]
    who = ", ".join(lost) or "a parameter server"
    where = (f"the latest checkpoint in {checkpointer.manager.directory} (epoch {int(checkpointer.epoch.numpy())})"
             if checkpointer else "scratch: no checkpoint_dir was given")
    return ParameterServerError(
        f"Lost {who} during epoch {epoch + 1} after {finished_steps} finished steps "
        f"({type(err).__name__}); its variables are gone, so training stopped. Restart the ps task(s) "
        f"and the chief (workers may stay up): the chief resumes from {where}."
    )


def run_config(config, cluster_info, print_fn=print, num_ps_shards=None, min_shard_bytes=None):
    """``tfpar.train``'s training loop for ``strategy='parameter_server'``.

    Worker and ps tasks block in ``serve()``. The chief trains per
    ``config`` and returns the loop fields ``tfpar.train.run`` expects
    (strategy, replicas, precision, epochs_done, steps_done, losses,
    accuracies, examples_per_sec, weights_sha256) plus ``num_ps``,
    ``initial_epoch``, ``loss_history`` and ``variable_placement``;
    ``run`` adds config, versions, task and wall time and writes
    ``summary.json``. ``num_ps_shards``/``min_shard_bytes`` partition large
    variables (default: one shard per ps task for weights over 256 KiB).
    """
    if cluster_info.task_type in SERVING_TASKS:
        serve(cluster_info)
        return None
    if config.grad_accum_steps > 1 or config.steps_per_execution > 1:
        raise ValueError("parameter_server training runs one batch per scheduled step; "
                         "use grad_accum_steps=1 and steps_per_execution=1.")
    from tfpar import data

    source = data.inspect(config.data, config.num_classes, config.seed)

    import keras

    from tfpar import precision, strategies, summary
    from tfpar import train as train_lib

    strategy, coordinator = create(cluster_info, num_ps_shards, min_shard_bytes)
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)
    batch = config.global_batch_size(1)  # one step is one batch on one worker
    pipes = data.make(config, batch, source)
    with strategy.scope():
        model = train_lib.build_model(config)
        optimizer, peak = train_lib.make_optimizer(config, batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=train_lib.make_loss(config))
    val = pipes.val.take(pipes.validation_steps) if pipes.val is not None and pipes.validation_steps else pipes.val
    if print_fn:
        print_fn(f"{strategies.describe(strategy, cluster_info)}: "
                 f"batch {batch} per step, precision {policy}, peak learning rate {peak:.4g}, "
                 f"{pipes.steps_per_epoch} steps/epoch")

    callbacks = [keras.callbacks.TensorBoard(log_dir=config.model_dir)] if config.tensorboard else []
    history = fit(
        model, coordinator, pipes.train, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
        validation_data=val, callbacks=callbacks, checkpoint_dir=os.path.join(config.model_dir, "checkpoints"),
        print_fn=print_fn if config.verbose != 0 else None,
    )
    hist = history.history
    final = _eval_fn(model, {"accuracy": sparse_accuracy})(val) if val is not None else {}
    rates = hist.get("examples_per_sec", [])
    return {
        "strategy": strategies.describe(strategy, cluster_info),
        "strategy_class": strategies.public_class(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "precision": policy,
        "global_batch_size": batch,
        "learning_rate_peak": peak,
        "num_ps": cluster_info.num_ps,
        "initial_epoch": history.initial_epoch,
        "epochs_done": history.initial_epoch + len(hist.get("loss", [])),
        "steps_done": history.finished_steps,
        "optimizer_updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "train_loss": float(hist["loss"][-1]) if hist.get("loss") else None,
        "train_accuracy": float(hist["accuracy"][-1]) if hist.get("accuracy") else None,
        "loss_history": [float(v) for v in hist.get("loss", [])],
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": float(np.median(rates)) if rates else None,
        "weights_sha256": summary.weights_checksum(model),
        "variable_placement": variable_placement(model),
    }
