"""Ray Train's elastic scaling across two Ray nodes on this machine, the second stopped mid-run.

Both nodes are started with the real ``ray start --block`` CLI, pinned to
127.0.0.1: Ray turns a loopback ``--node-ip-address`` into the machine's
routable address (``ray._private.services.resolve_ip_for_localhost``), which
this sandbox cannot reach, so the node processes run the CLI with that one
function made the identity (test-only), and the driver runs with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch that makes a driver use
the loopback address. Of two nodes on one address a driver attaches to the
head, where Ray Train v2 pins its controller, so the node killed holds only a
training worker. Each node is its own process group; a node is stopped the
way a machine dies, every process it started (its group and all descendants)
SIGKILLed at once. ``ray stop`` is not used because it would stop every Ray
on the machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import reap, tfpar_train_command

RAY_CLI = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
           "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               PYTHONUNBUFFERED="1", **extra)
    env.pop("TF_CONFIG", None)
    return env


def _processes():
    """{pid: (ppid, pgid)} of every live (not zombie) process on this machine."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # a zombie is dead, only not yet reaped
                    table[int(name)] = (int(fields[1]), int(fields[2]))
            except (OSError, ValueError, IndexError):
                pass
    return table


def _node_processes(pgid, known=()):
    """The processes of a node: its process group, every descendant of it (Ray workers the raylet
    started may sit in groups of their own), and ``known`` pids that still live."""
    table = _processes()
    members = {pid for pid, (_, group) in table.items() if group == pgid} | {pid for pid in known if pid in table}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in members} - members
        members |= children
        grew = bool(children)
    return members


def _kill_node(proc, timeout=30):
    """SIGKILL a ``ray start --block`` node the way a machine dies: every process it started at once
    (raylet, GCS, Ray workers), so no training worker of that node outlives it and trains on."""
    doomed = _node_processes(proc.pid)
    deadline = time.monotonic() + timeout
    while doomed and time.monotonic() < deadline:
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        doomed = _node_processes(proc.pid, known=doomed)
    reap(proc)
    return not doomed


@pytest.fixture
def two_nodes(tmp_path):
    """(address, the second node's process): a 1-CPU head and a 1-CPU second node on 127.0.0.1."""
    pytest.importorskip("ray.train")
    from tfpar.runtime import launcher

    port = launcher.free_ports(1)[0]
    nodes, temps = [], []

    def start(*args):
        temps.append(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths fit 107 characters
        temp = temps[-1]
        with open(tmp_path / f"node-{len(nodes)}.log", "w") as log:
            nodes.append(subprocess.Popen(
                [sys.executable, "-c", RAY_CLI, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 "--disable-usage-stats", f"--temp-dir={temp}", *args],
                stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True))
        return nodes[-1]

    try:
        start("--head", f"--port={port}", "--include-dashboard=false")
        second = start(f"--address=127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", second
    finally:
        stopped = [_kill_node(node) for node in nodes]
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        assert all(stopped), "Ray node processes left behind"


@pytest.mark.slow
def test_ray_elastic_run_loses_a_node_and_finishes_on_one_worker(two_nodes, tmp_path):
    """tfpar-train --launcher=ray --workers=1:2 on two nodes: the second node is killed after the first backup;
    Ray restarts the group on the one worker it can place, which resumes that backup and finishes the run."""
    address, second = two_nodes
    model_dir = tmp_path / "run"
    argv = [*tfpar_train_command(), "--launcher=ray", "--workers=1:2", "--model=resnet18", "--width_multiplier=0.125",
            "--image_size=16", "--batch_size=16", "--steps_per_epoch=3", "--epochs=4", "--validation_steps=0",
            "--tensorboard=false", "--checkpoint_best=false", "--verbose=0", f"--model_dir={model_dir}"]
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True,
                              env=_env(RAY_ADDRESS=address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    try:
        first = model_dir / "backup" / "step-000000003"
        deadline = time.monotonic() + 300
        while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "no backup after the first epoch"
        assert _kill_node(second)  # the second node is gone for the rest of the run
        out, _ = driver.communicate(timeout=400)
    finally:
        reap(driver)
    assert driver.returncode == 0, out[-4000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from"]["workers"] == 2 and summary["num_workers"] == 1, summary["resumed_from"]
    # killed right after the step-3 backup; a step-6 or step-9 backup may still be written before the
    # survivor notices the lost peer, but the one worker always trains on from there
    assert summary["resumed_from"]["step"] in (3, 6, 9), summary["resumed_from"]
    assert summary["epochs_done"] == 4 and summary["optimizer_updates"] == 12
    assert summary["examples_seen"] == 12 * 16
    assert 0 < summary["train_loss"] < 10
    resumed = summary["resumed_from"]
    assert (f"resuming epoch {resumed['epoch'] + 1} step {resumed['batch']} on 1 worker(s) (backup written by 2): "
            f"global batch 16 kept as 16 per worker") in out, out[-4000:]
