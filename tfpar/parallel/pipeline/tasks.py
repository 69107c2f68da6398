"""Pipeline stages on the worker tasks of a TF_CONFIG cluster: one client drives them all.

Worker task 0 (the chief) connects its eager context to the cluster
(``tf.config.experimental_connect_to_cluster``), so the other tasks' devices
(``/job:worker/replica:0/task:<i>/device:CPU:0``) are its devices too; the
in-process pipeline then puts stage s of copy r on task ``r * S + s`` (with
interleaved 1F1B on D tasks a copy, on task ``r * D + s mod D``: V = S / D
stages a task) and
TensorFlow's own runtime moves the activations and their gradients between
tasks (send/recv inside the step's function). The other tasks run only a
``tf.distribute.Server``: the chief, the one client, owns every
variable's handle, reads the data and writes backups and summaries.

This module says where the stages go and what each task is called; the
mechanisms are the runtime's: a stage task runs ``runtime.server.serve``
(``announcement``, until the ``chief`` has come and gone), and the chief
connects with ``runtime.peers.connect`` and watches the stage tasks with a
``runtime.peers.Heartbeat`` (``heartbeat_tasks``): a task that is dead or
silent ends the chief with one line naming it and exit 69, so the whole
cluster, whose servers held the variables, is restarted and the chief
resumes from its last backup.
"""

import threading
import time

JOB = "worker"
STAGE_TRACES = "stage_traces"  # under model_dir: the stage tasks' profiler traces (``StageTrace``)


def stages_of(task, stages, per_copy=None):
    """``(copy, [stage, ...])`` that worker ``task`` runs: one stage, or with interleaved 1F1B
    (``per_copy`` = D tasks a copy) stages d, d + D, ... of its copy."""
    per_copy = per_copy or stages
    copy, device = divmod(task, per_copy)
    return copy, list(range(device, stages, per_copy))


def _named(held):
    return f"stage {held[0]}" if len(held) == 1 else f"stages {', '.join(map(str, held))}"


def chief(info):
    """The address of worker 0, the one client that drives every stage task."""
    return info.cluster_spec[JOB][0]


def announcement(info, stages, per_copy=None):
    """What a stage task's server says (``runtime.server.serve``'s ``line``; it fills in ``{target}``)."""
    copy, held = stages_of(info.task_index, stages, per_copy)
    return (f"pipeline: {info.task_name} serves {_named(held)} of copy {copy} at {{target}}; "
            f"worker-0 ({chief(info)}) drives the run")


def devices(info, count):
    """The device of each task 0..count-1: its first GPU, else its CPU."""
    import tensorflow as tf

    names = [d.name for d in tf.config.list_logical_devices()]
    found = []
    for task in range(count):
        prefix = f"/job:{JOB}/replica:0/task:{task}/device:"
        gpu = [n for n in names if n.startswith(prefix + "GPU:")]
        found.append(sorted(gpu)[0] if gpu else prefix + "CPU:0")
    return found


def heartbeat_tasks(info, stage_devices, stages, per_copy=None):
    """``{name: device}`` of every stage task but this one: what ``runtime.peers.Heartbeat`` pings and, for a
    task that stops answering, names."""
    found = {}
    for task, device in enumerate(stage_devices):
        if task == info.task_index:
            continue
        copy, held = stages_of(task, stages, per_copy)
        found[f"pipeline task worker-{task} ({info.cluster_spec[JOB][task]}, {_named(held)} of copy {copy})"] = device
    return found


def _stage_trace_callback():
    import keras

    class StageTrace(keras.callbacks.Callback):
        """Trace every other task while the chief's TensorBoard callback traces steps ``first..last``.

        A ``tf.distribute.Server`` serves TF's profiler too, so the chief asks each stage task for a trace
        (``tf.profiler.experimental.client.trace``) long enough to cover those steps, from the step time so far.
        """

        def __init__(self, info, logdir, steps):
            super().__init__()
            self.info, self.logdir, (self.first, self.last) = info, logdir, steps
            self._step, self._times, self._threads = 0, [], []

        def on_train_batch_begin(self, batch, logs=None):
            self._step += 1
            self._times.append(time.monotonic())
            if self._step != self.first or len(self._times) < 2:
                return
            step_ms = 1000 * (self._times[-1] - self._times[-2])  # the last step: the first one also traced
            duration = int((self.last - self.first + 1) * step_ms * 1.5 + 500)
            import tensorflow as tf

            for address in self.info.cluster_spec[JOB][1:]:
                thread = threading.Thread(target=tf.profiler.experimental.client.trace, daemon=True,
                                          args=(f"grpc://{address}", self.logdir, duration))
                thread.start()
                self._threads.append(thread)

        def on_train_end(self, logs=None):
            for thread in self._threads:
                thread.join(timeout=60)

    return StageTrace


def __getattr__(name):  # StageTrace needs Keras; built on first use so this module imports without it
    if name == "StageTrace":
        return _stage_trace_callback()
    raise AttributeError(name)
