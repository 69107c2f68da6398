"""Hosts as network namespaces (tests/netns.py): training across real addresses, lost peers, cut links.

Each task runs in its own namespace with ``ip netns exec`` and a TF_CONFIG of
198.18.0.x addresses, as on separate machines: nothing reaches a peer over
127.0.0.1. Every wait is bounded; the ``netns_cluster`` fixture kills every
process and deletes every namespace, pass or fail.
"""

import json
import os
import sys
import time

import pytest

from helpers import tfpar_train_command

from tfpar.runtime import peers

PORT = 2222  # every host may use the same port: each namespace has its own
TINY = ["--model=resnet18", "--width_multiplier=0.125", "--batch_size=32", "--steps_per_epoch=4",
        "--validation_steps=1", "--tensorboard=false", "--verbose=2"]


def tf_config(spec, task_type, index):
    return json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}})


def env_for(spec, task_type, index):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               TF_CONFIG=tf_config(spec, task_type, index))
    return env


def wait_for(predicate, timeout, procs=(), poll=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if any(p.poll() is not None for p in procs):
            return predicate()
        time.sleep(poll)
    return False


def finish(procs, timeout):
    """Wait for every process (bounded in all); return their exit codes (None: still running)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            pass
    return [p.poll() for p in procs]


def start_workers(hosts, tmp_path, flags, run):
    """tfpar-train --strategy=multi_worker on every host; output in tmp_path/<run>-worker-<i>.log."""
    spec = {"worker": [f"{a}:{PORT}" for a in hosts.addresses]}
    procs, logs = [], []
    for i in range(len(hosts.hosts)):
        log = tmp_path / f"{run}-worker-{i}.log"
        logs.append(log)
        with open(log, "w") as out:
            procs.append(hosts.start(i, [*tfpar_train_command(), "--strategy=multi_worker", *TINY, *flags],
                                     env=env_for(spec, "worker", i), stdout=out))
    return spec, procs, logs


def summary(model_dir, name="summary.json"):
    with open(os.path.join(model_dir, name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_multi_worker_fit_across_hosts_gives_identical_weights_and_listens_only_at_tf_config(netns_cluster, tmp_path):
    hosts = netns_cluster(2)
    model_dir = str(tmp_path / "run")
    spec, procs, logs = start_workers(hosts, tmp_path, ["--epochs=2", f"--model_dir={model_dir}",
                                                        "--cluster_timeout=120"], "fit")
    # While they train: each host listens on exactly the TF_CONFIG port, and the only
    # address that port is reachable at from another host is the TF_CONFIG one.
    assert wait_for(lambda: all(hosts.listening(i) for i in range(2)), 120, procs)
    for i, address in enumerate(hosts.addresses):
        ports = {port for _, port in hosts.listening(i)}
        assert ports == {PORT}, (i, hosts.listening(i))
        addr_out = hosts.exec_ip(hosts.hosts[i], "-4", "-o", "addr", "show", "scope", "global").stdout
        assert [line.split()[3] for line in addr_out.splitlines()] == [f"{address}/24"]
    codes = finish(procs, 300)
    out = [log.read_text() for log in logs]
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    workers = [summary(model_dir, f"summary.worker-{i}.json") for i in range(2)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert all(w["num_workers"] == 2 and w["replicas"] == 2 and w["optimizer_updates"] == 8 for w in workers)
    assert "127.0.0.1" not in json.dumps(spec)


@pytest.mark.slow
def test_parameter_server_training_across_hosts(netns_cluster, tmp_path):
    hosts = netns_cluster(3)  # chief, worker, ps each on its own host
    chief, worker, ps = hosts.addresses
    spec = {"chief": [f"{chief}:{PORT}"], "worker": [f"{worker}:{PORT}"], "ps": [f"{ps}:{PORT}"]}
    serve = [sys.executable, "-c", "from tfpar.parallel import parameter_server; parameter_server.serve()"]
    servers = [hosts.start(2, serve, env=env_for(spec, "ps", 0), stdout=open(os.devnull, "w")),
               hosts.start(1, serve, env=env_for(spec, "worker", 0), stdout=open(os.devnull, "w"))]
    model_dir = tmp_path / "ps"
    log = tmp_path / "chief.log"
    with open(log, "w") as out:
        coordinator = hosts.start(0, [*tfpar_train_command(), "--strategy=parameter_server", "--model=alexnet_bn",
                                      "--width_multiplier=0.125", "--batch_size=32", "--epochs=2",
                                      "--steps_per_epoch=10", "--optimizer=adam", "--learning_rate=0.002",
                                      "--lr_reference_batch=0", "--lr_schedule=constant", "--tensorboard=false",
                                      f"--model_dir={model_dir}", "--verbose=1"],
                                  env=env_for(spec, "chief", 0), stdout=out)
    (code,) = finish([coordinator], 240)
    assert code == 0, log.read_text()[-4000:]
    assert all(s.poll() is None for s in servers)  # the servers served to the end
    result = summary(str(model_dir))
    assert result["steps_done"] == 20 and result["epochs_done"] == 2
    placement = result["variable_placement"]
    assert placement and all(f"/job:ps/" in d for devices in placement.values() for d in devices), placement


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["link_cut", "sigkill"])
def test_lost_peer_mid_run_every_survivor_exits_naming_it_and_restart_resumes(netns_cluster, tmp_path, fault):
    hosts = netns_cluster(2)
    model_dir = str(tmp_path / "run")
    timeout = 60  # --cluster_timeout
    flags = ["--epochs=8", "--backup_freq=2", f"--model_dir={model_dir}", f"--cluster_timeout={timeout}"]
    spec, procs, logs = start_workers(hosts, tmp_path, flags, "first")
    backup = os.path.join(model_dir, "backup")
    assert wait_for(lambda: os.path.isdir(os.path.join(backup, "step-000000004")), 240, procs), \
        logs[0].read_text()[-3000:]
    if fault == "link_cut":
        hosts.cut(1)  # worker-1's cable: both sides lose the other
        survivors = [0, 1]
    else:
        procs[1].kill()  # SIGKILL; `ip netns exec` execs, so this is the worker itself
        survivors = [0]
    lost_at = time.monotonic()
    codes = finish([procs[i] for i in survivors], timeout + 30)
    took = time.monotonic() - lost_at
    out = [logs[i].read_text() for i in range(2)]
    assert codes == [peers.EXIT_UNREACHABLE] * len(survivors), "\n".join(o[-3000:] for o in out)
    assert took < timeout, took
    for i in survivors:
        peer = 1 - i
        lines = [line for line in out[i].splitlines() if line.startswith("tfpar-train: error:")]
        assert lines == [f"tfpar-train: error: worker-{i} lost contact with worker-{peer} ({spec['worker'][peer]}) "
                         f"during training (heartbeat timeout {peers.heartbeat_timeout(timeout):g} s); exiting "
                         f"with 69 so the whole cluster is restarted and resumes from the last backup."], out[i][-3000:]
        assert "Traceback" not in out[i]
    if fault == "sigkill":
        assert procs[1].poll() == -9
    saved = max(int(name.split("-")[1]) for name in os.listdir(backup) if name.startswith("step-"))
    assert saved >= 4

    if fault == "link_cut":
        hosts.mend(1)
    _, procs, logs = start_workers(hosts, tmp_path, flags, "second")
    codes = finish(procs, 300)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    workers = [summary(model_dir, f"summary.worker-{i}.json") for i in range(2)]
    assert all(w["resumed_from"]["step"] == saved for w in workers), [w["resumed_from"] for w in workers]
    assert [w["optimizer_updates"] for w in workers] == [32, 32], [w["resumed_from"] for w in workers]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert not os.path.exists(backup)  # removed after the successful finish


def test_hosts_get_only_their_198_18_address_and_every_namespace_is_removed(netns_cluster):
    import netns

    stale = f"{netns.PREFIX}-999999999-abcdef-br"  # a pid above pid_max: its creator is surely gone
    netns._ip("netns", "add", stale)
    assert stale in netns.remove_stale() and stale not in netns.list_namespaces()
    hosts = netns_cluster(3)
    made = [hosts.bridge_ns, *hosts.hosts]
    assert set(made) <= set(netns.list_namespaces())
    for i, host in enumerate(hosts.hosts):
        out = hosts.exec_ip(host, "-4", "-o", "addr", "show").stdout
        assert sorted(line.split()[3] for line in out.splitlines()) == ["127.0.0.1/8", f"198.18.0.{i + 1}/24"]
    hosts.close()
    assert not set(made) & set(netns.list_namespaces())
