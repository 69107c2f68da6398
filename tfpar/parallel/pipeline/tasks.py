"""Pipeline stages on the worker tasks of a TF_CONFIG cluster: one client drives them all.

Worker task 0 (the chief) connects its eager context to the cluster
(``tf.config.experimental_connect_to_cluster``), so the other tasks' devices
(``/job:worker/replica:0/task:<i>/device:CPU:0``) are its devices too; the
in-process pipeline then puts stage s of copy r on task ``r * S + s`` and
TensorFlow's own runtime moves the activations and their gradients between
tasks (send/recv inside the step's function). The other tasks run only a
``tf.distribute.Server`` (``serve``): the chief, the one client, owns every
variable's handle, reads the data and writes backups and summaries.

Faults: ``Heartbeat`` pings every stage task from the chief with a tiny op;
a task that is dead or does not answer within ``preemption.heartbeat_timeout``
ends the chief with one line naming it and exit 69, so ``tfpar-launch
--restarts`` (or Slurm/Kubernetes) restarts the whole cluster, whose servers
held the variables, and the chief resumes from its last backup.
"""

import contextlib
import os
import socket
import sys
import threading
import time

JOB = "worker"
STAGE_TRACES = "stage_traces"  # under model_dir: the stage tasks' profiler traces (``StageTrace``)
CHIEF_GONE_SEC = 3.0  # a server leaves this long after the chief's port stopped answering


def stage_of(info, stages):
    """``(copy, stage)`` that task ``info`` runs."""
    return divmod(info.task_index, stages)


def serve(info, stages, print_fn=print):
    """Be a stage task: run a ``tf.distribute.Server`` until the chief has come and gone, then exit 0."""
    import tensorflow as tf

    server = tf.distribute.Server(tf.train.ClusterSpec(info.cluster_spec), job_name=JOB,
                                  task_index=info.task_index, protocol="grpc", start=True)
    copy, stage = stage_of(info, stages)
    chief = info.cluster_spec[JOB][0]
    if print_fn:
        print_fn(f"pipeline: {info.task_name} serves stage {stage} of copy {copy} at {server.target}; "
                 f"worker-0 ({chief}) drives the run")
    wait_for_chief(chief)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a started tf.distribute.Server cannot be stopped; leave without tearing it down


def _answers(address, timeout=1.0):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_chief(address, poll=0.5, gone_after=CHIEF_GONE_SEC):
    """Return once ``address`` accepted connections and then refused them for ``gone_after`` seconds."""
    seen, silent_since = False, None
    while True:
        if _answers(address):
            seen, silent_since = True, None
        elif seen:
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= gone_after:
                return
        time.sleep(poll)


def connect(info, seconds):
    """Connect this (chief) process to the cluster; one line and exit 69 when tasks stay unreachable."""
    import tensorflow as tf

    from tfpar.runtime import preemption

    deadline = time.monotonic() + seconds
    while True:
        try:
            tf.config.experimental_connect_to_cluster(info.resolver(), job_name=JOB, task_index=0, protocol="grpc",
                                                       make_master_device_default=False)
            return
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as err:
            if time.monotonic() > deadline:
                sys.stderr.write(f"tfpar-train: error: {info.task_name} could not reach the pipeline's stage tasks "
                                 f"within {seconds:g} s ({str(err).splitlines()[0][:200]}); check that every task "
                                 f"is started and that the TF_CONFIG addresses are reachable.\n")
                sys.stderr.flush()
                raise preemption.Unreachable() from None
            time.sleep(1.0)


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


class Heartbeat:
    """From the chief: ping each stage task with a tiny op; one that fails or hangs past ``timeout`` ends the run."""

    def __init__(self, info, stage_devices, timeout, stages):
        self.info, self.timeout, self.stages = info, timeout, stages
        self.devices = {t: d for t, d in enumerate(stage_devices) if t != info.task_index}
        now = time.monotonic()
        self.last = {t: now for t in self.devices}
        self.lost = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ping, args=(t,), daemon=True, name=f"tfpar-ping-{t}")
                         for t in self.devices]
        self._threads.append(threading.Thread(target=self._watch, daemon=True, name="tfpar-heartbeat"))
        for thread in self._threads:
            thread.start()

    def _ping(self, task):
        import tensorflow as tf

        one = tf.constant(1.0)
        while not self._stop.is_set():
            try:
                with tf.device(self.devices[task]):
                    answer = tf.identity(one)
                answer.numpy()
                self.last[task] = time.monotonic()
            except Exception:  # noqa: BLE001 - a dead task: stop refreshing; _watch decides
                pass
            self._stop.wait(min(1.0, self.timeout / 4))

    def _watch(self):
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for task, last in self.last.items():
                if now - last > self.timeout:
                    self.lost = task
                    self.end()

    def describe(self, task):
        copy, stage = divmod(task, self.stages)
        address = self.info.cluster_spec[JOB][task]
        return f"worker-{task} ({address}, stage {stage} of copy {copy})"

    def end(self):
        """One line naming the lost task, then exit 69 at once (the main thread may be stuck in a step)."""
        from tfpar.runtime import preemption

        sys.stderr.write(f"tfpar-train: error: {self.info.task_name} lost contact with pipeline task "
                         f"{self.describe(self.lost)}: no answer within {self.timeout:g} s; exiting with "
                         f"{preemption.EXIT_UNREACHABLE} so the whole cluster is restarted and resumes from the "
                         f"last backup.\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(preemption.EXIT_UNREACHABLE)

    def close(self):
        self._stop.set()


@contextlib.contextmanager
def stages_stay(heartbeat):
    """Inside: the pipelined ``fit``. A step that fails because a stage task is gone waits for the
    heartbeat's verdict (one line naming the task, exit 69) instead of a traceback."""
    import tensorflow as tf

    if heartbeat is None:
        yield
        return
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.InternalError):
        deadline = time.monotonic() + heartbeat.timeout + 2.0
        while time.monotonic() < deadline:  # heartbeat.end() exits the process when it names the task
            time.sleep(0.2)
        raise  # every stage task still answers: not a lost task, so the error itself is the news
    finally:
        heartbeat.close()


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
