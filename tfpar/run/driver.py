"""The training driver: ``TrainConfig`` -> ``run()`` -> summary dict.

cluster -> data check -> strategy -> precision -> model -> data -> compile ->
fit -> evaluate -> summary.json. Each step calls the module that owns it.

Strategies that need their own setup around training (DTensor sharding: Keras
``fit`` on a mesh via ``tfpar.sharding.layout_scope``; parameter servers: not
Keras ``fit``) plug in through ``TRAINING_LOOPS``: one line each.
"""

import dataclasses
import importlib
import logging
import os
import re
import tempfile
import time

from tfpar.run.config import DEFAULT_GLOBAL_BATCH, TrainConfig  # noqa: F401  (run() takes a TrainConfig)

log = logging.getLogger("tfpar")


# Strategy name -> "module:function" for strategies that need their own training
# loop instead of Keras ``fit``. The function is called as ``fn(config, cluster,
# print_fn)`` with a validated ``TrainConfig`` and ``tfpar.cluster.ClusterInfo``
# and returns a dict of results (keys as ``fit_loop`` returns; at least
# strategy, replicas, precision, epochs_done, steps_done). ``run()`` adds config,
# versions, task and wall time, and writes the summaries.
TRAINING_LOOPS = {
    "dtensor": "tfpar.run.dtensor_driver:train",
    "parameter_server": "tfpar.run.ps_driver:run_config",
}
OWN_LOOP_STRATEGIES = ("dtensor", "parameter_server")  # not a tf.distribute strategy's fit (DESIGN items 4, 5)


def resolve_jit_compile(setting, strategy):
    """Whether XLA runs for ``setting`` (auto|on|off) under ``strategy``: a bool.

    ``auto`` is on for GPUs/TPUs and off for CPUs (XLA made ResNet-50 3.5x
    slower on CPU, DESIGN item 11). ``tfpar.xla`` decides and also makes it work
    under tf.distribute strategies, where Keras 3's own ``jit_compile`` fails.
    """
    from tfpar.step import xla

    return xla.resolve(setting, strategy)


def fit_loop(config, info, print_fn=print, extra_callbacks=()):
    """The Keras ``fit`` path for every tf.distribute strategy that ``fit`` supports.

    ``print_fn=None`` keeps tfpar's own lines quiet (``config.verbose`` governs Keras's).
    ``extra_callbacks`` are appended to tfpar's own (an engine's reporting, e.g. ``tfpar.ray``).
    """
    from tfpar.run import data, recipe

    source = data.inspect(config.data, config.num_classes, config.seed)  # before TF touches devices

    import keras
    import tensorflow as tf

    from tfpar.step import all_reduce, steps, stragglers, xla
    from tfpar.runtime import backup, peers, precision, strategies
    from tfpar.run import callbacks
    from tfpar.core import summary

    # Fault tolerance: refuse a foreign or damaged backup before anything is written,
    # and never wait forever for peers that do not come up.
    backup_cb = backup.for_run(config, info, print_fn=print_fn)
    pipelined = config.strategy == "pipeline"
    if pipelined:
        from tfpar.run import pipeline_driver

        strategy = pipeline_driver.strategy(config, info)  # the pipeline places its own ops (on tasks in a cluster)
    with peers.within(config.cluster_timeout, info):
        strategy = strategy if pipelined else strategies.create(config.strategy, virtual_cpus=config.virtual_cpus)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.global_batch_size(replicas)  # one micro-batch over all replicas
    accum = config.grad_accum_steps
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)

    resume_step = backup_cb.resume.step if backup_cb is not None and backup_cb.resume is not None else 0
    balanced = config.balance_batches  # every worker reads the whole global stream and slices it (tfpar.stragglers)
    readers = 1 if pipelined or balanced else info.num_workers  # a pipeline's one client (the chief) reads every batch
    pipes = data.make(config, global_batch, source, num_workers=readers,
                      worker_index=info.task_index if readers > 1 else 0,
                      micro_batches=accum, skip_batches=resume_step)  # resumes at the backup's exact example
    jit = False if pipelined else resolve_jit_compile(config.jit_compile, strategy)
    with strategy.scope():
        model = recipe.build_model(config)
        if pipelined:
            model = pipeline_driver.split(config, model, global_batch, print_fn=print_fn)
        optimizer, peak = recipe.make_optimizer(config, global_batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=recipe.make_loss(config),
                      metrics=recipe.metrics(),
                      jit_compile=False, steps_per_execution=config.steps_per_execution)
    reduce_dtype = all_reduce.apply(model.optimizer, config.all_reduce_dtype, replicas)
    xla.enable(model, jit)  # per-replica XLA steps (tfpar/xla.py); Keras's own jit fails under strategies
    steps.accumulate(model, accum)  # one all-reduce per `accum` micro-batches; Keras's own fails under strategies
    bucket_mb = all_reduce.buckets(model, config.all_reduce_bucket_mb)  # overlap the backward pass; BN stats fused

    chief = info.is_chief
    model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", info.task_name)
    cbs, throughput = callbacks.for_run(config, model_dir, chief, global_batch * accum, pipes.val is not None,
                                        print_fn=print_fn, task_name=info.task_name,
                                        multi_worker=strategies.is_multi_worker(strategy))
    cbs.extend(extra_callbacks)
    if pipelined:
        cbs.extend(pipeline_driver.callbacks(config, model_dir))  # in a cluster, --profile_steps traces every task
    train_ds = pipes.train
    timing = _worker_times(config, model, strategy, global_batch, info, model_dir, print_fn if chief else None)
    if timing is not None:
        cbs.append(timing)
        if balanced:
            train_ds = stragglers.distribute(strategy, train_ds)
    if backup_cb is not None:
        if pipelined:
            backup_cb.io_device = pipeline_driver.io_device(config)  # remote stages' files on the chief's disk
        cbs.insert(0, backup_cb)  # first: it sets the initial epoch before the others begin
    name = strategies.describe(strategy)
    if pipelined:
        copies = f" ×{config.pipeline_replicas} copies" if config.pipeline_replicas > 1 else ""
        name = f"pipeline {config.stages} stages{copies}, {config.micro_batches} micro-batches ({config.schedule})"
    summed = f", gradients summed in {reduce_dtype}" if replicas > 1 else ""
    summed += f" in {bucket_mb:g} MiB buckets" if summed and bucket_mb else ""
    micro = f" x {accum} micro-batches per update" if accum > 1 else ""
    start_line = (f"{name}: global batch {global_batch}{micro}{summed}, precision {policy}, "
                  f"peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch")
    if print_fn and (chief or config.log_all_workers):
        print_fn(start_line)
    if chief and config.tensorboard:
        callbacks.write_text(model_dir, "run", start_line)
    try:
        heartbeat = pipeline_driver.heartbeat(config) if pipelined else None  # else TF's, for collectives
        with peers.stay(info, config.cluster_timeout, heartbeat):  # a peer lost mid-run: one line, exit 69
            history = model.fit(
                train_ds, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
                validation_data=pipes.val, validation_steps=pipes.validation_steps if pipes.val else None,
                callbacks=cbs, verbose=(config.verbose or 0) if (chief or config.log_all_workers) else 0,
                shuffle=False,  # the dataset shuffles itself
            )
            final = (model.evaluate(pipes.val, steps=pipes.validation_steps, return_dict=True, verbose=0)
                     if pipes.val is not None else {})
    except tf.errors.InvalidArgumentError as err:
        if "outside the valid range" in str(err):  # a label >= num_classes (or < 0) reached the loss
            raise ValueError(f"A label in {config.data!r} is outside [0, {config.num_classes}); "
                             f"check the data or --num_classes.") from None
        if "decode" in str(err).lower() or "image" in str(err).lower():
            first_line = str(err.message).strip().splitlines()[0]
            raise ValueError(f"An image in {config.data!r} could not be decoded ({first_line}).") from None
        raise
    hist = history.history
    last = lambda key: float(hist[key][-1]) if hist.get(key) else None  # noqa: E731
    return {
        "strategy": name,  # plain words; TF's class in strategy_class
        "strategy_class": strategies.public_class(strategy),
        "replicas": replicas,
        "precision": policy,
        "global_batch_size": global_batch,
        "examples_per_update": global_batch * accum,
        "learning_rate_peak": peak,
        "all_reduce_dtype": reduce_dtype,
        "all_reduce_bucket_mb": bucket_mb,
        "jit_compile": jit,
        "xla_steps": xla.state(model),
        "epochs_done": len(hist.get("loss", [])),
        "resumed_from": backup_cb.resumed if backup_cb is not None else None,
        "steps_done": sum(epoch["steps"] for epoch in throughput.epochs),
        "optimizer_updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "train_loss": last("loss"),
        "train_accuracy": last("accuracy"),
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": throughput.median_examples_per_sec(),
        "throughput": throughput.epochs,  # per epoch: examples_per_sec, step_time_ms, steps
        "weights_sha256": summary.weights_checksum(model),
        **({"pipeline": pipeline_driver.summary(config, model, model_dir)} if pipelined else {}),
        **({"worker_times": timing.report()} if timing is not None else {}),
    }


def _worker_times(config, model, strategy, global_batch, info, model_dir, print_fn):
    """``tfpar.stragglers``: the timed (and with balance_batches, sliced) step and its callback, or None."""
    from tfpar.step import stragglers

    reason = "pipeline stages time themselves (tfpar.pipeline)" if config.strategy == "pipeline" else \
        stragglers.supported(model)
    if reason and config.balance_batches:
        raise ValueError(f"balance_batches cannot be used here: {reason}.")
    if reason or not (config.worker_times or config.balance_batches):
        return None
    state = stragglers.enable(model, global_batch, balance=config.balance_batches)
    replicas = strategy.num_replicas_in_sync
    local = max(1, replicas // max(1, info.num_workers))
    if info.num_workers > 1:
        names = [f"worker {i // local}" + (f" replica {i % local}" if local > 1 else "") for i in range(replicas)]
    else:
        names = [f"replica {i}" for i in range(replicas)]
    return stragglers.WorkerTimes(
        state, names, every=config.balance_every,
        minimum=stragglers.minimum_share(global_batch, replicas, config.balance_min_fraction),
        log_dir=os.path.join(model_dir, "workers_timing") if config.tensorboard and info.is_chief else None,
        print_fn=print_fn)


def training_loop(strategy_name):
    """The function that trains under ``strategy_name``: a ``TRAINING_LOOPS`` entry or ``fit_loop``."""
    target = TRAINING_LOOPS.get(strategy_name)
    if target is None:
        if strategy_name in OWN_LOOP_STRATEGIES:
            raise ValueError(f"Strategy {strategy_name!r} needs its own training loop, which this build of tfpar lacks.")
        return fit_loop
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_model_dir(config):
    """One sentence, before anything is written, when model_dir is not writable or is another model's."""
    from tfpar.runtime import backup

    try:
        os.makedirs(config.model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=config.model_dir, prefix=".tfpar-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"model_dir {config.model_dir} is not writable ({err.strerror or err}).") from None
    backup.check_model_dir(config.model_dir, backup.signature(config))


def run(config, print_fn=print, callbacks=()):
    """Train as ``config`` says and return the summary (also written as JSON).

    Every process writes ``summary.<task>.json``; the chief also writes
    ``summary.json``. Both are written atomically. ``callbacks``: extra Keras
    callbacks for the ``fit`` strategies (the own-loop ones refuse them).
    """
    config.validate()
    from tfpar.runtime import cluster as cluster_lib

    info = cluster_lib.detect()  # fail on a bad TF_CONFIG before TF starts
    if config.strategy == "pipeline" and info.cluster_spec:
        from tfpar.parallel.pipeline import tasks as pipeline_tasks

        if pipeline_tasks.in_cluster(config, info):
            pipeline_tasks.check(config, info)  # a cluster shape the pipeline cannot use: one sentence
            if not info.is_chief:
                from tfpar.runtime import server

                server.serve(info, until_gone=pipeline_tasks.chief(info), print_fn=print_fn,
                             line=pipeline_tasks.announcement(info, config.stages))  # exits once the chief is done
    _check_model_dir(config)
    started = time.time()
    loop = training_loop(config.strategy)
    if callbacks and loop is not fit_loop:
        raise ValueError(f"Extra Keras callbacks need a Keras fit strategy; {config.strategy} has its own loop.")
    result = loop(config, info, print_fn, extra_callbacks=callbacks) if callbacks else loop(config, info, print_fn)

    from tfpar.core import summary

    result = {
        "config": dataclasses.asdict(config),
        "task": info.task_name,
        "is_chief": info.is_chief,
        "num_workers": info.num_workers,
        "versions": summary.versions(),
        **result,
        "wall_time_sec": time.time() - started,
    }
    summary.write_json_atomic(os.path.join(config.model_dir, f"summary.{info.task_name}.json"), result)
    if info.is_chief:
        summary.write_json_atomic(os.path.join(config.model_dir, "summary.json"), result)
    return result
