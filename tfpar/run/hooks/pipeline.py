"""``Pipeline``: ``--strategy=pipeline``, Keras ``fit`` on the pipelined model under TF's default strategy.

The pipeline places its own ops; ``--batch_size`` is the batch of one step, split into
``--micro_batches`` x ``--pipeline_replicas`` micro-batches. In a TF_CONFIG cluster the chief
drives stage tasks (``tfpar.parallel.pipeline.tasks``) that only serve; this hook decides
that from the config and passes plain values down.
"""

import collections
import os

from tfpar.run.hooks.keras_fit import KerasFit


def in_cluster(info):
    """Whether a pipeline run with ``info`` runs across the tasks of a cluster (not on a TPU's)."""
    return bool(info.cluster_spec) and info.source != "tpu"


def devices_per_copy(config, info):
    """D, the devices (tasks, in a cluster) of one pipeline copy: ``--pipeline_devices``, else ``--stages``;
    interleaved 1F1B in a cluster: its worker tasks / copies. One sentence when interleaved has neither."""
    from tfpar.parallel.pipeline import tasks

    if config.pipeline_devices:
        return config.pipeline_devices
    if config.schedule != "interleaved_1f1b":
        return config.stages
    if in_cluster(info):
        return max(1, len(info.cluster_spec.get(tasks.JOB, [])) // config.pipeline_replicas)
    raise ValueError("--schedule=interleaved_1f1b puts several stages on each device; say how many devices with "
                     "--pipeline_devices=D (--stages = V x D).")


def check_cluster(spec, stages, replicas, per_copy=None):
    """One sentence (``ValueError``) for a cluster the pipeline cannot use."""
    from tfpar.parallel.pipeline import tasks

    need = (per_copy or stages) * replicas
    if "ps" in spec:
        raise ValueError(f"--strategy=pipeline runs its stages on worker tasks, but the cluster has a ps job "
                         f"({len(spec['ps'])} task(s)); use a cluster of {need} worker task(s) and no ps.")
    others = [job for job in spec if job != tasks.JOB]
    if others:
        raise ValueError(f"--strategy=pipeline puts stage i on worker task i and worker 0 drives the run, but the "
                         f"cluster also has a {others[0]} job; list all {need} task(s) under 'worker'.")
    workers = len(spec.get(tasks.JOB, []))
    if workers != need:
        shape = f"--stages={stages}" if (per_copy or stages) == stages else \
            f"--stages={stages} on --pipeline_devices={per_copy}"
        raise ValueError(f"--strategy=pipeline with {shape} x --pipeline_replicas="
                         f"{replicas} needs exactly {need} worker task(s), one per stage copy, "
                         f"but the cluster has {workers}.")


class Pipeline(KerasFit):
    def __init__(self, config, info, print_fn=print):
        super().__init__(config, info, print_fn)
        self.stage_devices = None  # in a cluster: each stage copy's task device
        self.heartbeat = None  # in a cluster: the chief's peers.Heartbeat on the stage tasks

    def check(self):
        from tfpar.parallel.pipeline import schedules

        config, per_copy = self.config, devices_per_copy(self.config, self.info)
        if in_cluster(self.info):
            check_cluster(self.info.cluster_spec, config.stages, config.pipeline_replicas, per_copy)
        schedules.check_shape(config.schedule, config.stages, per_copy, config.micro_batches)

    def serves(self):
        return in_cluster(self.info) and not self.info.is_chief

    def serve(self):
        from tfpar.parallel.pipeline import tasks
        from tfpar.runtime import server

        server.serve(self.info, until_gone=tasks.chief(self.info), print_fn=self.print_fn,
                     line=tasks.announcement(self.info, self.config.stages, devices_per_copy(self.config, self.info)))  # exits once the chief is done

    def _make_strategy(self):
        """TF's default strategy, after splitting the CPU into stages x copies devices when there is no GPU.

        In a cluster it connects to the stage tasks instead and starts their heartbeat; each task
        then has its own device for its stage.
        """
        import tensorflow as tf

        from tfpar.core import devices
        from tfpar.parallel.pipeline import tasks
        from tfpar.runtime import peers

        config, per_copy = self.config, devices_per_copy(self.config, self.info)
        count = per_copy * config.pipeline_replicas
        if in_cluster(self.info):
            peers.connect(self.info, config.cluster_timeout, "the pipeline's stage tasks")
            self.stage_devices = tasks.devices(self.info, count)
            self.heartbeat = peers.Heartbeat(
                self.info, tasks.heartbeat_tasks(self.info, self.stage_devices, config.stages, per_copy),
                peers.heartbeat_timeout(config.cluster_timeout))
            return tf.distribute.get_strategy()
        if config.virtual_cpus is not None or tf.config.list_physical_devices("GPU"):
            count = config.virtual_cpus
        if count:
            devices.configure_virtual_cpus(count)
        return tf.distribute.get_strategy()

    def _readers(self):
        return 1  # the chief, the one client, reads every batch

    def _resolve_jit(self):
        return False  # its stages run on different devices

    def shaped(self, model, global_batch):
        from tfpar.parallel import pipeline

        config = self.config
        return pipeline.split(model, stages=config.stages, micro_batches=config.micro_batches,
                              schedule=config.schedule, balance=config.balance, replicas=config.pipeline_replicas,
                              devices=self.stage_devices, batch_size=global_batch, print_fn=self.print_fn,
                              pipeline_devices=devices_per_copy(config, self.info))

    def _more_callbacks(self):
        """In a cluster with ``--profile_steps``: the callback that traces the stage tasks too."""
        from tfpar.parallel.pipeline import tasks

        traced = self.config.profile_range() if self.config.tensorboard else None
        if not self.stage_devices or not traced:
            return []
        return [tasks.StageTrace(self.heartbeat.info, os.path.join(self.model_dir, tasks.STAGE_TRACES), traced)]

    def _timing_unsupported(self, model):
        return "pipeline stages time themselves (tfpar.pipeline)"

    def callbacks(self, model, global_batch, pipes, extra):
        from tfpar.parallel.pipeline import tasks

        cbs = super().callbacks(model, global_batch, pipes, extra)
        if self.backup is not None and self.stage_devices:
            self.backup.io_device = f"/job:{tasks.JOB}/replica:0/task:0/device:CPU:0"  # stages' files on the chief
        return cbs

    def name(self):
        config = self.config
        copies = f" ×{config.pipeline_replicas} copies" if config.pipeline_replicas > 1 else ""
        per_copy = devices_per_copy(config, self.info)
        on = f" on {per_copy} devices" if per_copy != config.stages else ""
        return f"pipeline {config.stages} stages{on}{copies}, {config.micro_batches} micro-batches ({config.schedule})"

    def guard(self):
        from tfpar.runtime import peers

        return peers.stay(self.info, self.config.cluster_timeout, self.heartbeat)  # a stage task lost: one line, exit 69

    def summary(self, model, history, pipes):
        return {**super().summary(model, history, pipes), "pipeline": self._pipeline_summary(model)}

    def _pipeline_summary(self, model):
        """The ``pipeline`` entry of summary.json: settings, the stage table and the bubble (theory, measured)."""
        from tfpar.parallel.pipeline import schedules, timeline

        config = self.config
        per_copy = model.plan.devices_per_copy or config.stages
        measured = timeline.read_run(self.model_dir, devices=per_copy if per_copy != config.stages else None)
        return {
            "stages": config.stages, "micro_batches": config.micro_batches, "schedule": config.schedule,
            "devices_per_copy": per_copy,
            "balance": config.balance, "replicas": config.pipeline_replicas, "devices": model.plan.devices,
            "stage_table": model.stage_table,
            # Where TF holds each variable (model and optimizer slots): in a cluster, on each stage's task.
            "variable_devices": _count_devices(model.original.weights),
            "optimizer_variable_devices": _count_devices(model.optimizer.variables),
            "bubble_theory": round(schedules.bubble(config.stages, config.micro_batches, per_copy), 4),
            "bubble_measured": measured["bubble"] if measured else None,  # needs --profile_steps
            "timeline": measured,
        }


def _count_devices(variables):
    return dict(sorted(collections.Counter(getattr(v, "value", v).device for v in variables).items()))
