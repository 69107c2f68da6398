"""The one ``serve()`` (tfpar/runtime/server.py): its parameters, and real servers on 127.0.0.1."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import quiet_env, reap
from tfpar.runtime import cluster, launcher, server


def _info(task_type, index, workers=3, ps=1):
    spec = {"worker": [f"127.0.0.1:{2000 + i}" for i in range(workers)], "ps": [f"127.0.0.1:{3000 + i}"
                                                                               for i in range(ps)]}
    return cluster.from_tf_config(json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}}))


class _FakeServer:
    def __init__(self, spec, job_name, task_index, protocol, config, start):
        self.job_name, self.task_index, self.config, self.target = job_name, task_index, config, "grpc://fake"

    def join(self):
        raise AssertionError("start_only must not join")


def test_serve_starts_this_tasks_server_with_the_options_it_is_given(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.distribute, "Server", _FakeServer)
    lines = []
    worker = server.serve(_info("worker", 2), worker_threads=True, start_only=True, print_fn=lines.append)
    assert (worker.job_name, worker.task_index) == ("worker", 2)
    assert worker.config.inter_op_parallelism_threads == 3  # one per worker, at least 2
    assert server.serve(_info("worker", 0, workers=1), worker_threads=True, start_only=True,
                        print_fn=None).config.inter_op_parallelism_threads == 2
    assert server.serve(_info("worker", 1), start_only=True, print_fn=None).config.inter_op_parallelism_threads == 0
    ps = server.serve(_info("ps", 0), worker_threads=True, start_only=True, print_fn=lines.append,
                      line="serving {job}:{index} at {target}")
    assert ps.config.inter_op_parallelism_threads == 0  # TF's default: the threads option is for workers
    assert lines == ["worker-2 serving at grpc://fake", "serving ps:0 at grpc://fake"]


@pytest.mark.parametrize("info", [
    cluster.ClusterInfo("chief", 0, 2, 1, "tf_config", {"chief": ["a:1"], "worker": ["a:2"], "ps": ["a:3"]}),
    cluster.ClusterInfo(),  # no cluster at all
])
def test_serve_refuses_a_task_that_is_not_a_worker_or_ps_of_a_cluster(info):
    with pytest.raises(ValueError, match=f"serve\\(\\) is for 'worker' and 'ps' tasks.*'{info.task_name}'"):
        server.serve(info)


def _listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def test_wait_until_gone_returns_only_after_the_address_came_and_went(monkeypatch):
    # Scripted answers: refusals before the address ever answered do not count; the first refusal after
    # it answered does (gone_after=0).
    script = iter([False, False, False, True, True, False, True])
    asked = []
    monkeypatch.setattr(server, "answers", lambda address: asked.append(address) or next(script))
    server.wait_until_gone("chief:1", poll=0, gone_after=0)
    assert asked == ["chief:1"] * 6


def test_wait_until_gone_waits_for_a_real_port_to_close():
    sock, address = _listener()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (server.wait_until_gone(address, poll=0.05, gone_after=0.3),
                                              done.set()), daemon=True)
    waiter.start()
    assert not done.wait(1.0)  # it answers: still there
    sock.close()
    closed = time.monotonic()
    assert done.wait(5.0)
    assert time.monotonic() - closed >= 0.3  # refused for gone_after seconds first


def _read_line(proc, prefix, timeout):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting {prefix!r}: {''.join(lines)[-3000:]}")


@pytest.mark.slow  # a real process
def test_a_server_until_gone_serves_while_the_chief_is_up_and_exits_0_after_it_left():
    chief, chief_address = _listener()
    port = launcher.free_ports(1)[0]
    spec = {"worker": [chief_address, f"127.0.0.1:{port}"]}
    info = json.dumps({"cluster": spec, "task": {"type": "worker", "index": 1}})
    code = ("import sys; from tfpar.runtime import cluster, server; "
            f"server.serve(cluster.from_tf_config({info!r}), until_gone={chief_address!r}, "
            "line='{task} at {target}, until the chief is gone')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=quiet_env())
    try:
        line = _read_line(proc, "worker-1 at", 120)
        assert line == f"worker-1 at grpc://127.0.0.1:{port}, until the chief is gone"
        assert server.answers(f"127.0.0.1:{port}")
        time.sleep(1.0)
        assert proc.poll() is None  # the chief is still there
        chief.close()
        assert proc.wait(timeout=30) == 0
    finally:
        chief.close()
        reap(proc)


@pytest.mark.slow  # a real process
def test_tfpar_launch_serve_serves_its_tf_config_task_until_killed():
    ports = launcher.free_ports(2)
    spec = {"chief": [f"127.0.0.1:{ports[0]}"], "ps": [f"127.0.0.1:{ports[1]}"]}
    env = dict(quiet_env(), TF_CONFIG=json.dumps({"cluster": spec, "task": {"type": "ps", "index": 0}}))
    proc = subprocess.Popen([sys.executable, "-m", "tfpar.launcher", "--serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    try:
        assert _read_line(proc, "serving", 120) == f"serving ps:0 at grpc://127.0.0.1:{ports[1]}"
        assert server.answers(spec["ps"][0])
        time.sleep(1.0)
        assert proc.poll() is None
    finally:
        reap(proc)
