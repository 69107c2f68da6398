"""``tfpar-train --strategy=pipeline``: the pieces ``tfpar.train.fit_loop`` calls for a pipeline run.

The run is Keras ``fit`` on the pipelined model under TF's default strategy
(the pipeline places its own ops); ``--batch_size`` is the batch of one
step, split into ``--micro_batches`` x ``--pipeline_replicas`` micro-batches.
"""

import collections
import logging
import os

from tfpar.parallel.pipeline import tasks

log = logging.getLogger("tfpar")
_CLUSTER = {}  # id(config) -> (stage devices, peers.Heartbeat) once strategy() connected to a cluster


def _cluster(config):
    """``(stage devices, heartbeat)`` of a run connected to a cluster's tasks, else ``(None, None)``."""
    return _CLUSTER.get(id(config), (None, None))


def check(config):
    """One sentence for pipeline flags that cannot work (called from ``TrainConfig.validate``)."""
    from tfpar.parallel.pipeline import balance, schedules

    for name in ("stages", "micro_batches", "pipeline_replicas"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    schedules.check(config.schedule)
    balance.check(config.balance)
    if config.grad_accum_steps > 1:
        raise ValueError("grad_accum_steps does not apply to --strategy=pipeline; its --micro_batches already "
                         "sum the gradients of several micro-batches per update.")
    if config.jit_compile == "on":
        raise ValueError("jit_compile=on does not apply to --strategy=pipeline (its stages run on different "
                         "devices); use jit_compile=auto or off.")
    if config.all_reduce_dtype != "float32":
        raise ValueError("all_reduce_dtype applies to mirrored and multi_worker; --strategy=pipeline sums its "
                         "copies' gradients in float32.")
    per_step = config.micro_batches * config.pipeline_replicas
    if config.batch_size is not None and config.batch_size % per_step:
        raise ValueError(f"batch_size {config.batch_size} does not split into {config.micro_batches} micro-batches "
                         f"x {config.pipeline_replicas} pipeline copies; use a multiple of {per_step}.")
    if config.per_replica_batch_size is not None:
        raise ValueError("--strategy=pipeline takes --batch_size (the batch of one step), not "
                         "--per_replica_batch_size.")


def strategy(config, info=None):
    """TF's default strategy, after splitting the CPU into stages x copies devices when there is no GPU.

    In a cluster (``tasks.in_cluster``) it connects to the stage tasks instead and starts their heartbeat
    (``heartbeat(config)``); each task then has its own device for its stage.
    """
    import tensorflow as tf

    from tfpar.runtime import peers, strategies

    if info is not None and tasks.in_cluster(config, info):
        count = config.stages * config.pipeline_replicas
        peers.connect(info, config.cluster_timeout, "the pipeline's stage tasks")
        config_devices = tasks.devices(info, count)
        _CLUSTER[id(config)] = (config_devices, peers.Heartbeat(
            info, tasks.heartbeat_tasks(info, config_devices, config.stages),
            peers.heartbeat_timeout(config.cluster_timeout)))
        return tf.distribute.get_strategy()
    count = config.virtual_cpus
    if count is None and not tf.config.list_physical_devices("GPU"):
        count = config.stages * config.pipeline_replicas
    if count:
        strategies.configure_virtual_cpus(count)
    return tf.distribute.get_strategy()


def split(config, model, global_batch, print_fn=print):
    """``model`` pipelined as the flags say (on the cluster's tasks after ``strategy`` connected to them)."""
    from tfpar.parallel import pipeline

    devices, _ = _cluster(config)
    return pipeline.split(model, stages=config.stages, micro_batches=config.micro_batches,
                          schedule=config.schedule, balance=config.balance, replicas=config.pipeline_replicas,
                          devices=devices, batch_size=global_batch, print_fn=print_fn)


def io_device(config):
    """In a cluster, the chief's CPU: every stage's checkpoint file IO happens there (``None`` in one process)."""
    devices, _ = _cluster(config)
    return f"/job:{tasks.JOB}/replica:0/task:0/device:CPU:0" if devices else None


def callbacks(config, model_dir):
    """In a cluster with ``--profile_steps``: the callback that traces the stage tasks too."""
    devices, heartbeat = _cluster(config)
    traced = config.profile_range() if config.tensorboard else None
    if not devices or not traced:
        return []
    return [tasks.StageTrace(heartbeat.info, os.path.join(model_dir, tasks.STAGE_TRACES), traced)]


def heartbeat(config):
    """In a cluster, the ``peers.Heartbeat`` on the stage tasks, for ``peers.stay`` around ``fit``; else None."""
    return _cluster(config)[1]


def summary(config, model, model_dir, step_ms=None):
    """The ``pipeline`` entry of summary.json: settings, the stage table and the bubble (theory, measured)."""
    from tfpar.core import trace
    from tfpar.parallel.pipeline import schedules, timeline

    measured = None
    remote = trace.find(os.path.join(model_dir, tasks.STAGE_TRACES))  # the stage tasks' traces, in a cluster
    for path in trace.find(model_dir):
        if path in remote:
            continue
        try:
            measured = timeline.read(path, other_tasks=remote)
        except ValueError as err:
            log.info("no pipeline timeline in %s: %s", path, err)
    return {
        "stages": config.stages, "micro_batches": config.micro_batches, "schedule": config.schedule,
        "balance": config.balance, "replicas": config.pipeline_replicas, "devices": model.plan.devices,
        "stage_table": model.stage_table,
        # Where TF holds each variable (model and optimizer slots): in a cluster, on each stage's task.
        "variable_devices": _count_devices(model.original.weights),
        "optimizer_variable_devices": _count_devices(model.optimizer.variables),
        "bubble_theory": round(schedules.bubble(config.stages, config.micro_batches), 4),
        "bubble_measured": measured["bubble"] if measured else None,  # needs --profile_steps
        "timeline": measured,
    }


def _count_devices(variables):
    return dict(sorted(collections.Counter(getattr(v, "value", v).device for v in variables).items()))
