"""Preemption and unreachable peers: exit codes, SIGTERM handling, start-up deadline.

Kubernetes, Slurm and Cloud TPU announce a preemption with SIGTERM and kill
the process a grace period later. ``watch()`` notes the signal; the backup
callback asks ``agreed(strategy)`` at every batch end and, when it says yes,
saves a backup and exits with ``EXIT_PREEMPTED`` so a launcher restarts it.

Agreement across workers is a per-step all-reduce (SUM) of a 0/1 flag: every
worker asks at the same step, so all of them see the same answer and save at
the same step, as ``MultiWorkerMirroredStrategy`` checkpoints need. It is one
scalar collective per step on top of the gradient all-reduce. TF's
``tf.distribute.experimental.PreemptionCheckpointHandler`` does the same job
through the coordination service, but it drives its own checkpoint and
counts its own steps, which does not fit Keras ``fit`` callbacks and
tfpar's atomic backup layout.

The signal is noticed by a thread reading ``signal.set_wakeup_fd``, which
starts the grace-period timer without waiting for the main thread. A main
thread blocked inside TensorFlow *while holding the GIL* (as MWMS start-up
does) stops that thread too; the orchestrator's SIGKILL ends such a process,
and ``peers_within`` bounds the start-up case through TF's own registration
deadline.
"""

import contextlib
import os
import re
import signal
import sys
import threading

from tfpar.core.devices import any_worker_fn, is_multi_worker

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: a backup is saved; restart me
EXIT_UNREACHABLE = 69  # sysexits EX_UNAVAILABLE: the other workers could not be reached
DEFAULT_GRACE_SEC = 25.0  # Kubernetes waits 30 s between SIGTERM and SIGKILL by default


class Preempted(SystemExit):
    """Raised after a preemption backup; exits the process with ``EXIT_PREEMPTED``."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class Watch:
    """SIGTERM seen? Agreed by all workers? Started by ``watch()``, ended by ``close()``."""

    def __init__(self, grace_period, print_fn):
        self.grace_period = grace_period
        self.print_fn = print_fn
        self.requested = threading.Event()
        self._timer = None
        self._any_worker = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._listen, name="tfpar-sigterm", daemon=True)
        self._thread.start()

    def _listen(self):
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data and not self.requested.is_set():
                self.requested.set()
                self._timer = threading.Timer(self.grace_period, self._out_of_time)
                self._timer.daemon = True
                self._timer.start()

    def _out_of_time(self):
        sys.stderr.write(f"tfpar: SIGTERM and no training step finished within {self.grace_period:g} s; "
                         f"exiting with {EXIT_PREEMPTED} without a new backup\n")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)

    def agreed(self, strategy):
        """True on every worker once any worker got SIGTERM (same answer, same step)."""
        flag = self.requested.is_set()
        if strategy is None or not is_multi_worker(strategy):
            return flag
        import tensorflow as tf

        if self._any_worker is None:
            self._any_worker = any_worker_fn(strategy)
        return int(self._any_worker(tf.constant(int(flag), tf.int32)).numpy()) > 0

    def exit(self, what):
        """Leave training with ``EXIT_PREEMPTED`` (the grace timer stays armed in case exiting hangs)."""
        self.print_fn(f"preempted (SIGTERM): {what}; exiting with {EXIT_PREEMPTED} so the launcher restarts")
        self._restore_signals()
        raise Preempted()

    def _restore_signals(self):
        if self._old_handler is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        signal.signal(signal.SIGTERM, self._old_handler)
        self._old_handler = None
        os.close(self._write_fd)  # the listener reads EOF and ends

    def close(self):
        """Stop watching: put back the previous SIGTERM handler and cancel the timer."""
        self._restore_signals()
        if self._timer is not None:
            self._timer.cancel()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)


def watch(grace_period=DEFAULT_GRACE_SEC, print_fn=print):
    """Start watching for SIGTERM (call from the main thread); returns a ``Watch``.

    Returns None when not on the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return Watch(grace_period, print_fn or (lambda *a, **k: None))


class Unreachable(SystemExit):
    """Raised when the other workers did not register in time; exits with ``EXIT_UNREACHABLE``."""

    def __init__(self):
        super().__init__(EXIT_UNREACHABLE)


MAX_HEARTBEAT_TIMEOUT_SEC = 10.0  # TF's own default heartbeat timeout


def heartbeat_timeout(seconds):
    """How long a silent peer is tolerated mid-run: a quarter of ``--cluster_timeout``, at most TF's 10 s default,
    so that a lost peer is noticed, and every survivor has exited, within ``--cluster_timeout``."""
    return max(1.0, min(seconds / 4.0, MAX_HEARTBEAT_TIMEOUT_SEC))


def _configure_register_timeout(cluster, seconds):
    """Give TF's coordination service a registration deadline before the strategy starts it.

    Without one a worker waits for absent peers for an hour, holding the GIL
    (so no Python watchdog thread can run). MultiWorkerMirroredStrategy keeps
    a coordination service that is already configured; this is its own set-up
    plus ``cluster_register_timeout_in_ms`` and a heartbeat timeout derived
    from the same ``seconds`` (``heartbeat_timeout``).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context
    import tensorflow as tf

    if context.context().coordination_service is not None or cluster.task_type not in ("chief", "worker"):
        return
    spec = tf.train.ClusterSpec(cluster.cluster_spec)
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(seconds * 1000),
        heartbeat_timeout_in_ms=int(heartbeat_timeout(seconds) * 1000))


@contextlib.contextmanager
def peers_within(seconds, cluster):
    """Inside: start a multi-worker strategy. If the peers do not all register within
    ``seconds``, print one line and exit with ``EXIT_UNREACHABLE`` instead of hanging."""
    import tensorflow as tf

    if cluster.num_workers < 2 or not cluster.cluster_spec or not seconds:
        yield
        return
    _configure_register_timeout(cluster, seconds)
    try:
        yield
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError):
        sys.stderr.write(f"tfpar-train: error: {cluster.task_name} could not reach the other workers within "
                         f"{seconds:g} s; check that every task is started and that the TF_CONFIG addresses "
                         f"are reachable.\n")
        sys.stderr.flush()
        raise Unreachable() from None


_UNHEALTHY = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def lost_peers(message, cluster):
    """The task names a TF peer-loss error names: the tasks that stopped sending heartbeats, or the
    coordination leader when this task's own heartbeats to it failed (its link is the one cut)."""
    _, marker, tail = message.partition("stopped sending heartbeats")
    if marker:
        names = [f"{job}-{task}" for job, task in _UNHEALTHY.findall(tail.split("The tasks have")[0])]
        names = [n for n in dict.fromkeys(names) if n != cluster.task_name]
        if names:
            return names
    if "CoordinationService" in message:  # e.g. "RPC: /tensorflow.CoordinationService/Heartbeat"
        import tensorflow as tf
        from tensorflow.python.distribute import multi_worker_util

        leader = multi_worker_util.coordination_leader(tf.train.ClusterSpec(cluster.cluster_spec))
        found = _UNHEALTHY.findall(leader)
        if found and f"{found[0][0]}-{found[0][1]}" != cluster.task_name:
            return [f"{found[0][0]}-{found[0][1]}"]
    return []


@contextlib.contextmanager
def peers_stay(cluster, seconds):
    """Inside: multi-worker training. When a peer is lost mid-run (killed, its link cut), TF aborts the
    collectives; print one line naming the lost peer and exit with ``EXIT_UNREACHABLE`` so the whole
    cluster restarts and resumes from the last backup."""
    import tensorflow as tf

    if cluster.num_workers < 2 or not cluster.cluster_spec:
        yield
        return
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError) as err:
        message = str(err)
        peers = lost_peers(message, cluster)
        address = {f"{kind}-{i}": a for kind, addrs in cluster.cluster_spec.items() for i, a in enumerate(addrs)}
        who = (", ".join(f"{p} ({address[p]})" if p in address else p for p in peers)
               if peers else "a peer")
        sys.stderr.write(f"tfpar-train: error: {cluster.task_name} lost contact with {who} during training "
                         f"(heartbeat timeout {heartbeat_timeout(seconds):g} s); exiting with {EXIT_UNREACHABLE} "
                         f"so the whole cluster is restarted and resumes from the last backup.\n")
        sys.stderr.flush()
        raise Unreachable() from None
