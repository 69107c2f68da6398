"""Parameter-server training with real processes on 127.0.0.1.

Each test starts ps and worker servers (``parameter_server.serve()``) and a
chief as separate processes with their own TF_CONFIG, bounds every wait and
kills every process group it started, pass or fail.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tfpar.core import backup_store
from tfpar.runtime import cluster
from tfpar.parallel import parameter_server

# The chief through tfpar.train.run, with partitioning options the CLI has no flags for.
CHIEF = """
import functools, json, sys
from tfpar.run import driver as train
from tfpar.run.hooks.parameter_server import ParameterServer
train.HOOKS["parameter_server"] = functools.partial(ParameterServer, **json.loads(sys.argv[2]))
train.run(train.TrainConfig(**json.loads(sys.argv[1])), print_fn=lambda s: print(s, flush=True))
"""
CLI = "import sys; from tfpar.cli import run_main; sys.argv[0] = 'tfpar-train'; run_main()"
SERVE = "from tfpar.parallel import parameter_server; parameter_server.serve()"


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """chief + workers + ps as processes; ``close()`` kills them all."""

    def __init__(self, workers=2, ps=1):
        ports = iter(_free_ports(1 + workers + ps))
        self.spec = {
            "chief": [f"127.0.0.1:{next(ports)}"],
            "worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
            "ps": [f"127.0.0.1:{next(ports)}" for _ in range(ps)],
        }
        self.procs = {}

    def env(self, task_type, index):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        env["TF_CONFIG"] = json.dumps({"cluster": self.spec, "task": {"type": task_type, "index": index}})
        return env

    def start(self, task_type, index, args=(), **kwargs):
        proc = subprocess.Popen([sys.executable, *args], env=self.env(task_type, index),
                                start_new_session=True, **kwargs)
        self.procs[f"{task_type}-{index}"] = proc
        return proc

    def start_servers(self):
        for task_type in ("ps", "worker"):
            for index in range(len(self.spec[task_type])):
                self.start(task_type, index, ["-c", SERVE], stdout=subprocess.DEVNULL)

    def start_chief(self, flags):
        """``tfpar-train`` as the chief, its output readable line by line."""
        return self.start("chief", 0, ["-c", CLI, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kill(self, name):
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self):
        for name in list(self.procs):
            try:
                self.kill(name)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@pytest.fixture
def local_cluster():
    made = []

    def make(**kwargs):
        made.append(LocalCluster(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _read_lines(proc, until, deadline):
    """Chief output lines until ``until(line)`` is true, the process ends or time runs out."""
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if until(line):
            break
    return lines


def _finish(proc, lines, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("chief timed out:\n" + "\n".join(lines) + out[-4000:])
    return "\n".join(lines) + "\n" + out


def _config(model_dir, **overrides):
    # alexnet_bn: plain AlexNet at this width sometimes sits at chance for 60 async steps.
    config = dict(model="alexnet_bn", width_multiplier=0.125, image_size=32, batch_size=32, epochs=3,
                  steps_per_epoch=20, strategy="parameter_server", optimizer="adam", learning_rate=0.002,
                  lr_reference_batch=0, lr_schedule="constant", model_dir=str(model_dir), tensorboard=True,
                  verbose=1)
    config.update(overrides)
    return config


def _flags(model_dir, **overrides):
    return [f"--{k}={v}" for k, v in _config(model_dir, **overrides).items()]


@pytest.mark.slow
def test_async_training_under_launch_local_reaches_target_steps_with_variables_on_ps(tmp_path):
    """chief + 2 workers + 1 ps started by ``tfpar-launch --workers 2 --ps 1``."""
    options = {"num_ps_shards": 2, "min_shard_bytes": 256 << 10}
    command = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--ps", "1", "--timeout", "240", "--",
               sys.executable, "-c", CHIEF, json.dumps(_config(tmp_path)), json.dumps(options)]
    launcher = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _finish(launcher, [], timeout=270)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_done"] == 60
    assert summary["epochs_done"] == 3
    assert summary["strategy"] == "parameter servers (2 workers, 1 ps)"  # plain words; TF's class apart
    assert summary["strategy_class"] == "tf.distribute.ParameterServerStrategy"
    losses = summary["loss_history"]
    assert losses[-1] < losses[0] * 0.9, losses
    placement = summary["variable_placement"]
    assert placement and all("/job:ps/" in d for devices in placement.values() for d in devices), placement
    # The 512x512 dense kernels (1 MiB) are split in the two shards asked for;
    # weights under min_shard_bytes (a 55 KiB conv kernel, a bias) are not.
    assert len(placement["fc6/kernel"]) == 2 and len(placement["fc7/kernel"]) == 2, placement
    assert len(placement["conv3/kernel"]) == 1 and len(placement["fc6/bias"]) == 1, placement
    assert backup_store.latest(str(tmp_path / "checkpoints")).step == 60  # the chief's epoch-3 checkpoint


@pytest.mark.slow
def test_killed_worker_is_survived_and_shards_spread_over_ps_tasks(local_cluster, tmp_path):
    c = local_cluster(workers=2, ps=2)
    c.start_servers()
    chief = c.start_chief(_flags(tmp_path, epochs=4))
    lines = _read_lines(chief, lambda line: line.startswith("epoch 1/"), time.monotonic() + 180)
    assert lines and lines[-1].startswith("epoch 1/"), "\n".join(lines)[-4000:]
    c.kill("worker-1")
    out = _finish(chief, lines, timeout=240)
    assert chief.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_done"] == 80 and summary["epochs_done"] == 4, out[-4000:]
    assert c.procs["worker-0"].poll() is None and c.procs["worker-1"].poll() is not None
    assert summary["workers_lost"] == ["worker-1"] and out.count("worker-1 is lost; training goes on with 1 worker(s)") == 1
    # Two ps tasks: one shard of each big kernel on each, by default (num_ps_shards = number of ps).
    assert sorted(d.split("/")[1] + d.split("/")[3] for d in summary["variable_placement"]["fc6/kernel"]) == [
        "job:pstask:0", "job:pstask:1"]


@pytest.mark.slow
def test_lost_ps_stops_with_clear_error_and_restart_resumes_from_checkpoint(local_cluster, tmp_path):
    c = local_cluster(workers=1, ps=1)
    c.start_servers()
    flags = _flags(tmp_path, epochs=5, steps_per_epoch=10, tensorboard=False)
    chief = c.start_chief(flags)
    lines = _read_lines(chief, lambda line: line.startswith("epoch 2/"), time.monotonic() + 180)
    assert lines and lines[-1].startswith("epoch 2/"), "\n".join(lines)[-4000:]
    c.kill("ps-0")
    out = _finish(chief, lines, timeout=180)
    assert chief.returncode != 0
    assert f"ParameterServerError: Lost ps:0 ({c.spec['ps'][0]}) during epoch" in out, out[-4000:]
    assert not (tmp_path / "summary.json").exists()

    c.start("ps", 0, ["-c", SERVE], stdout=subprocess.DEVNULL)
    chief = c.start_chief(flags)
    out = _finish(chief, [], timeout=240)
    assert chief.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_epoch"] >= 2, summary["initial_epoch"]
    assert summary["epochs_done"] == 5 and summary["steps_done"] == 50


def test_serve_and_chief_entry_points_reject_the_wrong_task():
    spec = {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"], "ps": ["127.0.0.1:3"]}
    chief = cluster.ClusterInfo("chief", 0, 2, 1, "tf_config", spec)
    with pytest.raises(ValueError, match="serve\\(\\) is for 'worker' and 'ps' tasks.*'chief-0'"):
        parameter_server.serve(chief)
    with pytest.raises(ValueError, match="runs on the 'chief'.*'worker-0' with 0 ps"):
        parameter_server.create(cluster.ClusterInfo())
