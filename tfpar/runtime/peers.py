"""Lost peers: every task of a cluster either reaches the others or ends with one line and exit 69.

Two moments, one rule. At start-up (``within`` for a strategy's collectives,
``connect`` for a client such as the pipeline's chief) the other tasks must
answer within ``--cluster_timeout``. Mid-run (``stay``) a peer that is killed,
hung or cut off must be noticed within the same ``--cluster_timeout``. Either
way the task prints one ``tfpar-train: error:`` line naming what it could not
reach and exits with ``EXIT_UNREACHABLE``, so that ``tfpar-launch --restarts``
(or Slurm/Kubernetes) restarts the whole cluster, which resumes from the last
backup, instead of hanging for an hour or dying with a traceback.

Mid-run the collectives of ``MultiWorkerMirroredStrategy`` have TF's own
coordination-service heartbeats (configured by ``within``): ``stay`` turns
TF's abort into the line, naming the peer TF names (``lost_peers``). A client
that places ops on other tasks' devices has no such service, so it runs its
own ``Heartbeat``: a tiny op on each task, and the line and exit from a
watcher thread, since the main thread may be stuck in a step.
"""

import contextlib
import os
import re
import sys
import threading
import time

EXIT_UNREACHABLE = 69  # sysexits EX_UNAVAILABLE: the other tasks could not be reached
MAX_HEARTBEAT_TIMEOUT_SEC = 10.0  # TF's own default heartbeat timeout
_UNHEALTHY = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
_UNREACHABLE_TARGET = re.compile(r"from remote target /job:(\w+)/replica:\d+/task:(\d+)[^\n]*\n[^\n]*grpc_status:14")


class Unreachable(SystemExit):
    """Raised after the one line about an unreachable or lost peer; exits with ``EXIT_UNREACHABLE``."""

    def __init__(self):
        super().__init__(EXIT_UNREACHABLE)


def _error(line):
    sys.stderr.write(f"tfpar-train: error: {line}\n")
    sys.stderr.flush()


def _unreachable(info, what, seconds, detail=""):
    _error(f"{info.task_name} could not reach {what} within {seconds:g} s{detail}; check that every task is "
           f"started and that the TF_CONFIG addresses are reachable.")
    return Unreachable()


def _lost(info, what):
    _error(f"{info.task_name} lost contact with {what}; exiting with {EXIT_UNREACHABLE} so the whole cluster is "
           f"restarted and resumes from the last backup.")
    return Unreachable()


def heartbeat_timeout(seconds):
    """How long a silent peer is tolerated mid-run: a quarter of ``--cluster_timeout``, at most TF's 10 s default,
    so that a lost peer is noticed, and every survivor has exited, within ``--cluster_timeout``."""
    return max(1.0, min(seconds / 4.0, MAX_HEARTBEAT_TIMEOUT_SEC))


def _configure_register_timeout(info, seconds):
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

    if context.context().coordination_service is not None or info.task_type not in ("chief", "worker"):
        return
    spec = tf.train.ClusterSpec(info.cluster_spec)
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(seconds * 1000),
        heartbeat_timeout_in_ms=int(heartbeat_timeout(seconds) * 1000))


def _in_cluster(info):
    return info.num_workers >= 2 and bool(info.cluster_spec)


@contextlib.contextmanager
def within(seconds, info):
    """Inside: start a multi-worker strategy. If the peers do not all register within ``seconds``, print one
    line and exit with ``EXIT_UNREACHABLE`` instead of hanging."""
    import tensorflow as tf

    if not _in_cluster(info) or not seconds:
        yield
        return
    _configure_register_timeout(info, seconds)
    try:
        yield
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError):
        raise _unreachable(info, "the other workers", seconds) from None


def connect(info, seconds, what="the other tasks"):
    """Connect this process, as ``info``'s task, to the cluster so it can place ops on the other tasks'
    devices; retried until ``seconds`` have passed, then one line naming ``what`` and exit 69."""
    import tensorflow as tf

    deadline = time.monotonic() + seconds
    while True:
        try:
            tf.config.experimental_connect_to_cluster(info.resolver(), job_name=info.task_type,
                                                       task_index=info.task_index, protocol="grpc",
                                                       make_master_device_default=False)
            return
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as err:
            if time.monotonic() > deadline:
                raise _unreachable(info, what, seconds, f" ({str(err).splitlines()[0][:200]})") from None
            time.sleep(1.0)


class Heartbeat:
    """From a client: ping each task with a tiny op on its device; one that fails or hangs past ``timeout``
    ends the process with one line naming it and exit 69 (the main thread may be stuck in a step).

    ``tasks`` maps the name the line gives a task to its device.
    """

    def __init__(self, info, tasks, timeout):
        self.info, self.timeout, self.devices = info, timeout, dict(tasks)
        now = time.monotonic()
        self.last = {name: now for name in self.devices}
        self.lost = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ping, args=(name,), daemon=True, name=f"tfpar-ping-{i}")
                         for i, name in enumerate(self.devices)]
        self._threads.append(threading.Thread(target=self._watch, daemon=True, name="tfpar-heartbeat"))
        for thread in self._threads:
            thread.start()

    def _ping(self, name):
        import tensorflow as tf

        one = tf.constant(1.0)
        while not self._stop.is_set():
            try:
                with tf.device(self.devices[name]):
                    answer = tf.identity(one)
                answer.numpy()
                self.last[name] = time.monotonic()
            except Exception:  # noqa: BLE001 - a dead task: stop refreshing; _watch decides
                pass
            self._stop.wait(min(1.0, self.timeout / 4))

    def _watch(self):
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for name, last in self.last.items():
                if now - last > self.timeout:
                    self.lost = name
                    self.end()

    def end(self):
        """One line naming the lost task, then exit 69 at once."""
        _lost(self.info, f"{self.lost}: no answer within {self.timeout:g} s")
        sys.stdout.flush()
        os._exit(EXIT_UNREACHABLE)

    def close(self):
        self._stop.set()


def lost_peers(message, info):
    """The task names a TF peer-loss error names: the tasks that stopped sending heartbeats; the remote
    targets whose connection failed (gRPC UNAVAILABLE, e.g. a peer killed mid-collective, before any heartbeat
    was missed); or the coordination leader when this task's own heartbeats to it failed (its link is cut)."""
    _, marker, tail = message.partition("stopped sending heartbeats")
    if marker:
        names = [f"{job}-{task}" for job, task in _UNHEALTHY.findall(tail.split("The tasks have")[0])]
        names = [n for n in dict.fromkeys(names) if n != info.task_name]
        if names:
            return names
    names = [f"{job}-{task}" for job, task in _UNREACHABLE_TARGET.findall(message)]
    names = [n for n in dict.fromkeys(names) if n != info.task_name]
    if names:
        return names
    if "CoordinationService" in message:  # e.g. "RPC: /tensorflow.CoordinationService/Heartbeat"
        import tensorflow as tf
        from tensorflow.python.distribute import multi_worker_util

        leader = multi_worker_util.coordination_leader(tf.train.ClusterSpec(info.cluster_spec))
        found = _UNHEALTHY.findall(leader)
        if found and f"{found[0][0]}-{found[0][1]}" != info.task_name:
            return [f"{found[0][0]}-{found[0][1]}"]
    return []


def _peer_loss_errors():
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError)


@contextlib.contextmanager
def _collectives_stay(info, seconds):
    try:
        yield
    except _peer_loss_errors() as err:
        peers = lost_peers(str(err), info)
        address = {f"{kind}-{i}": a for kind, addrs in info.cluster_spec.items() for i, a in enumerate(addrs)}
        who = ", ".join(f"{p} ({address[p]})" if p in address else p for p in peers) if peers else "a peer"
        raise _lost(info, f"{who} during training (heartbeat timeout {heartbeat_timeout(seconds):g} s)") from None


@contextlib.contextmanager
def _heartbeat_stays(heartbeat):
    import tensorflow as tf

    try:
        yield
    except (*_peer_loss_errors(), tf.errors.InternalError):
        deadline = time.monotonic() + heartbeat.timeout + 2.0
        while time.monotonic() < deadline:  # heartbeat.end() exits the process when it names the task
            time.sleep(0.2)
        raise  # every task still answers: not a lost task, so the error itself is the news
    finally:
        heartbeat.close()


def stay(info, seconds, heartbeat=None):
    """Around training: a peer lost mid-run (killed, hung, its link cut) ends this task with one line naming
    it and exit 69, so the whole cluster is restarted and resumes from the last backup.

    With a ``Heartbeat`` (a client driving other tasks' devices), a failed step waits for its verdict and the
    heartbeat is closed on the way out. Without one, for collectives, TF's abort after its own heartbeat
    timeout (``heartbeat_timeout(seconds)``, set by ``within``) is the verdict.
    """
    if heartbeat is not None:
        return _heartbeat_stays(heartbeat)
    if not _in_cluster(info):
        return contextlib.nullcontext()
    return _collectives_stay(info, seconds)


def unanswered(info, task_type="worker", seconds=1.0):
    """The ``task_type`` tasks of ``info``'s cluster whose address takes no TCP connection now, by name.

    For a cluster that survives a lost peer (parameter servers): what it is
    training without. A refused or timed-out connect counts; no TensorFlow.
    """
    import socket

    lost = []
    for index, address in enumerate(info.cluster_spec.get(task_type, [])):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=seconds).close()
        except (OSError, ValueError):
            lost.append(f"{task_type}-{index}")
    return lost
