"""One ``serve()``: the ``tf.distribute.Server`` of a task that only serves (a worker or ps task).

Three kinds of task run nothing but a server: the workers and parameter
servers of a parameter-server cluster (``tfpar.parallel.parameter_server``),
the built-in servers ``tfpar-launch --ps`` starts (``tfpar-launch --serve``),
and the stage tasks of a pipeline across tasks, which the chief drives from
its own process. They differ only in what ``serve`` takes as parameters: the
inter-op threads of a worker, the line announcing the server, and when it
ends: never (``join``, until killed), or once the chief's address has come and
gone (``until_gone``), since a started server cannot be stopped and a stage
task has nothing else to tell it that the run is over.
"""

import os
import socket
import sys
import time

SERVING_TASKS = ("worker", "ps")
GONE_AFTER_SEC = 3.0  # ``until_gone``: the address refused connections this long, after it had answered


def serve(info=None, *, worker_threads=False, until_gone=None, line="{task} serving at {target}", print_fn=print,
          start_only=False):
    """Run this worker or ps task's ``tf.distribute.Server``; by default block in ``join`` until killed.

    ``info``: a ``ClusterInfo`` (default ``cluster.detect()``, i.e. ``TF_CONFIG``); a task of another job is a
    ``ValueError``. ``worker_threads``: give a worker task ``max(2, workers)`` inter-op threads, so a
    parameter-server worker keeps its variable reads and writes flowing while it runs one step at a time.
    ``line`` is announced with ``print_fn`` (None: silent) and may name ``{task}``, ``{job}``, ``{index}`` and
    ``{target}``. ``until_gone``: an address (the chief's); exit 0 once it has answered and then stopped answering.
    ``start_only``: return the started server instead.
    """
    from tfpar.runtime import cluster

    info = info or cluster.detect()
    if info.task_type not in SERVING_TASKS or not info.cluster_spec:
        raise ValueError(f"serve() is for 'worker' and 'ps' tasks of a TF_CONFIG cluster; this task is "
                         f"{info.task_name!r}.")
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto()
    if worker_threads and info.task_type == "worker":
        config.inter_op_parallelism_threads = max(2, len(info.cluster_spec.get("worker", [])))
    server = tf.distribute.Server(tf.train.ClusterSpec(info.cluster_spec), job_name=info.task_type,
                                  task_index=info.task_index, protocol="grpc", config=config, start=True)
    if print_fn:
        print_fn(line.format(task=info.task_name, job=info.task_type, index=info.task_index, target=server.target))
        sys.stdout.flush()  # a launcher streams it: show it now, not when the server ends
    if start_only:
        return server
    if until_gone:
        wait_until_gone(until_gone)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # a started tf.distribute.Server cannot be stopped; leave without tearing it down
    server.join()


def answers(address, timeout=1.0):
    """Whether ``host:port`` accepts a TCP connection now."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until_gone(address, poll=0.5, gone_after=GONE_AFTER_SEC):
    """Return once ``address`` accepted connections and then refused them for ``gone_after`` seconds."""
    seen, silent_since = False, None
    while True:
        if answers(address):
            seen, silent_since = True, None
        elif seen:
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= gone_after:
                return
        time.sleep(poll)
