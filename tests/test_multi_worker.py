"""The local launcher, and multi-worker training through it with real processes.

Launcher tests use tiny shell/python commands (fast tier). Training tests run
``tfpar-train --strategy=multi_worker`` as 2 and 3 worker processes on
127.0.0.1 (``slow``): loss goes down and every worker ends with the same weights.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_reaped

from tfpar.runtime import cluster, launcher
from tfpar.core import trace

LAUNCH = [sys.executable, "-m", "tfpar.launcher"]


def run_launcher(args, timeout=120, **kwargs):
    code, out, _ = run_reaped(LAUNCH + args, timeout, merge_output=True, **kwargs)
    return code, out


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_plan_gives_each_task_a_valid_tf_config():
    tasks = launcher.plan(["prog"], workers=3, port_base=23000)
    assert [t.name for t in tasks] == ["worker-0", "worker-1", "worker-2"]
    assert [t.address for t in tasks] == ["127.0.0.1:23000", "127.0.0.1:23001", "127.0.0.1:23002"]
    infos = [cluster.from_tf_config(launcher.tf_config(tasks, t)) for t in tasks]
    assert [(i.task_type, i.task_index, i.num_workers, i.is_chief) for i in infos] == [
        ("worker", 0, 3, True), ("worker", 1, 3, False), ("worker", 2, 3, False)]
    assert all(t.argv == ["prog"] and not t.is_server for t in tasks)


def test_plan_with_ps_adds_a_chief_coordinator_and_builtin_servers():
    tasks = launcher.plan(["prog"], workers=2, ps=1)
    assert [t.name for t in tasks] == ["chief-0", "worker-0", "worker-1", "ps-0"]
    assert tasks[0].argv == ["prog"] and not tasks[0].is_server
    assert all(t.is_server and t.argv == launcher.server_argv() for t in tasks[1:])
    assert len({t.address for t in tasks}) == 4
    info = cluster.from_tf_config(launcher.tf_config(tasks, tasks[3]))
    assert (info.task_type, info.num_workers, info.num_ps) == ("ps", 3, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(workers=0), "--workers must be at least 1"),
    (dict(workers=2, ps=-1), "--ps must be 0 or more"),
    (dict(workers=2, port_base=80), "--port-base must leave room"),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launcher.plan(["prog"], **kwargs)
    with pytest.raises(ValueError, match="No COMMAND"):
        launcher.plan([], workers=2)


def test_streams_prefixed_output_and_succeeds():
    code, out = run_launcher(["--workers", "3", "--", sys.executable, "-c",
                              "import os, json; t = json.loads(os.environ['TF_CONFIG'])['task']; "
                              "print('hello from', t['type'], t['index'])"])
    assert code == 0, out
    for i in range(3):
        assert f"[worker-{i}] hello from worker {i}\n" in out


def test_first_failure_stops_every_process_group_and_sets_the_exit_code(tmp_path):
    # worker-0 starts a grandchild in its group and waits; worker-1 fails with 3.
    script = (
        "import json, os, subprocess, sys, time\n"
        "i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "if i == 1:\n"
        f"    while not os.path.exists({str(tmp_path / 'pid')!r}): time.sleep(0.05)\n"
        "    sys.exit(3)\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(tmp_path / 'pid.tmp')!r}, 'w').write(str(child.pid))\n"
        f"os.rename({str(tmp_path / 'pid.tmp')!r}, {str(tmp_path / 'pid')!r})\n"
        "time.sleep(300)\n"
    )
    started = time.monotonic()
    code, out = run_launcher(["--workers", "2", "--", sys.executable, "-c", script])
    assert code == 3, out
    assert "worker-1 failed with exit code 3" in out
    assert time.monotonic() - started < 60
    grandchild = int((tmp_path / "pid").read_text())
    assert not pid_alive(grandchild)


def sigterm_launcher_once_up(worker_code, marker):
    """Launch 2 workers running ``worker_code`` (each appends 'x' to ``marker`` when up),
    SIGTERM the launcher once both are up; return (exit code, output, the workers' pids)."""
    proc = subprocess.Popen(LAUNCH + ["--workers", "2", "--", sys.executable, "-c", worker_code],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and len(marker.read_text()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                                               capture_output=True, text=True).stdout.split()]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, pids


def test_sigterm_stops_everything(tmp_path):
    marker = tmp_path / "started"
    code, out, pids = sigterm_launcher_once_up(
        f"import time; open({str(marker)!r}, 'a').write('x'); time.sleep(300)", marker)
    assert len(pids) == 2
    assert code == 128 + signal.SIGTERM, out
    assert not any(pid_alive(p) for p in pids)


def test_sigterm_to_the_launcher_gives_workers_time_to_save(tmp_path):
    # A worker that needs longer than the failure-stop grace (5 s) to save after SIGTERM.
    saver = (f"import json, os, signal, sys, time\n"
             f"index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
             f"def save(*_):\n"
             f"    time.sleep(7); open(os.path.join({str(tmp_path)!r}, f'saved-{{index}}'), 'w').close(); sys.exit(75)\n"
             f"signal.signal(signal.SIGTERM, save)\n"
             f"open(os.path.join({str(tmp_path)!r}, 'up'), 'a').write('x')\n"
             f"time.sleep(300)\n")
    code, out, _ = sigterm_launcher_once_up(saver, tmp_path / "up")
    assert code == 128 + signal.SIGTERM, out
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"], out


def test_timeout_exits_124():
    code, out = run_launcher(["--workers", "2", "--timeout", "2", "--", "sleep", "300"])
    assert code == 124, out
    assert "timeout after 2 s" in out


def test_ps_topology_succeeds_when_the_chief_does_and_stops_the_servers():
    code, out = run_launcher(["--workers", "2", "--ps", "1", "--servers", "command", "--", sys.executable, "-c",
                              "import os, json, time; t = json.loads(os.environ['TF_CONFIG'])['task']\n"
                              "if t['type'] != 'chief': time.sleep(300)\n"
                              "print('coordinator done')"])
    assert code == 0, out
    assert "[chief-0] coordinator done" in out


# --- real multi-worker training through the launcher (slow) ------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def epoch_losses(out, task="worker-0"):
    """Training loss per epoch from the chief's Keras progress lines (val_loss is not matched)."""
    import re

    return [float(m) for line in out.splitlines() if line.startswith(f"[{task}]")
            for m in re.findall(r"\bloss: ([0-9.]+)", line)]


@pytest.mark.slow
@pytest.mark.parametrize("workers,policy,summed_in,accum", [(2, "float32", "float32", 1),
                                                            (3, "mixed_bfloat16", "bfloat16", 2)])
def test_tfpar_train_multi_worker_fit_and_evaluate(tmp_path, workers, policy, summed_in, accum):
    train = os.path.join(os.path.dirname(sys.executable), "tfpar-train")
    code, out = run_launcher([
        "--workers", str(workers), "--timeout", "400", "--", train, "--strategy=multi_worker", "--model=resnet18",
        "--width_multiplier=0.125", f"--precision={policy}", f"--batch_size={16 * workers}", "--epochs=3",
        "--steps_per_epoch=4", "--validation_steps=2", "--profile_steps=6,7", "--verbose=2",
        f"--all_reduce_dtype={summed_in}", f"--grad_accum_steps={accum}", f"--model_dir={tmp_path}"], timeout=420)
    assert code == 0, out[-4000:]
    summaries = [json.loads((tmp_path / f"summary.worker-{i}.json").read_text()) for i in range(workers)]
    assert {s["weights_sha256"] for s in summaries} == {summaries[0]["weights_sha256"]}  # identical weights
    assert all(s["replicas"] == workers and s["num_workers"] == workers for s in summaries)
    # Plain words for people; TF's public class (not CollectiveAllReduceStrategy) in its own field.
    assert all(s["strategy"] == f"multi-worker ×{workers}" and s["precision"] == policy for s in summaries)
    assert all(s["strategy_class"] == "tf.distribute.MultiWorkerMirroredStrategy" for s in summaries)
    assert all(s["all_reduce_dtype"] == summed_in and s["all_reduce_bucket_mb"] == 25 for s in summaries)
    assert f"gradients summed in {summed_in} in 25 MiB buckets" in out  # tfpar's default: buckets
    # Readable: only the chief prints its start line, epoch lines and result.
    assert out.count(f"[worker-0] multi-worker ×{workers}: ") == 1 and "[worker-1] multi-worker" not in out
    assert out.count("done: ") == 1 and "[worker-0] done: " in out
    assert summaries[0]["steps_done"] == summaries[0]["optimizer_updates"] == 12  # a step is one update
    assert all(s["examples_per_update"] == 16 * workers * accum for s in summaries)
    assert {s["val_loss"] for s in summaries} == {summaries[0]["val_loss"]}  # evaluate agrees on every worker
    losses = epoch_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0], out[-4000:]
    # The chief alone traced steps 6-7 (tfpar.run.callbacks.for_run); its trace shows the all-reduce beside the compute.
    traces = trace.find(str(tmp_path))
    assert len(traces) == 1 and "workers" not in traces[0], traces
    breakdown = trace.step_breakdown(traces[0])
    assert breakdown["steps"] == 2 and breakdown["all_reduce_ms"] > 0 and breakdown["compute_ms"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy,optimizer", [("float32", "SGD"), ("mixed_bfloat16", "SGD"),
                                              ("mixed_float16", "LossScaleOptimizer")])
def test_keras_fit_evaluate_predict_under_multi_worker(tmp_path, policy, optimizer):
    code, out = run_launcher(["--workers", "2", "--timeout", "220", "--", sys.executable,
                              os.path.join(HERE, "mw_keras_fit.py"), str(tmp_path), f"--precision={policy}"], timeout=240)
    assert code == 0, out[-4000:]
    results = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    for r in results:
        assert r["policy"] == policy and r["optimizer"] == optimizer
        assert r["loss"][-1] < r["loss"][0]
        assert r["predictions_shape"] == [64, 2]  # predict gathers every row, in order of the input
