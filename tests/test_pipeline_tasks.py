"""Pipeline stages on worker processes (tfpar/parallel/pipeline/tasks.py): real tasks on 127.0.0.1 via tfpar-launch.

Each cluster run is compared with the same pipeline in one process (its
stages on virtual CPUs): same loss, same weights (rtol 1e-5). Bad cluster
shapes are checked in this process with a fake TF_CONFIG (no task starts).
"""

import json
import os
import signal
import sys

import numpy as np
import pytest

from helpers import quiet_env, reap, run_reaped, tfpar_train_command

from tfpar.run import cli
from tfpar.runtime import peers
from tfpar.parallel.pipeline import placement

LAUNCH = [sys.executable, "-m", "tfpar.launcher"]
TINY = ["--strategy=pipeline", "--model=resnet18", "--width_multiplier=0.125", "--batch_size=16",
        "--micro_batches=4", "--balance=layers", "--steps_per_epoch=4", "--validation_steps=1", "--epochs=3",
        "--learning_rate=0.05", "--notensorboard", "--verbose=0", "--backup_freq=2"]


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("tfpar-train: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


BAD_SHAPES = {
    "fewer tasks than stages x replicas": (
        ["--stages=2", "--pipeline_replicas=2"], {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "needs exactly 4 worker task(s), one per stage copy, but the cluster has 2"),
    "more tasks than stages": (["--stages=2"], {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]},
                               "needs exactly 2 worker task(s), one per stage copy, but the cluster has 3"),
    "a ps job": (["--stages=2"], {"worker": ["127.0.0.1:1", "127.0.0.1:2"], "ps": ["127.0.0.1:3"]},
                 "the cluster has a ps job (1 task(s)); use a cluster of 2 worker task(s) and no ps"),
    "a chief job": (["--stages=2"], {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
                    "but the cluster also has a chief job; list all 2 task(s) under 'worker'"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_a_cluster_the_pipeline_cannot_use_exits_2_with_one_sentence(case, tmp_path, monkeypatch, capsys):
    flags, spec, expected = BAD_SHAPES[case]
    task = next(iter(spec))
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": spec, "task": {"type": task, "index": 0}}))
    code = cli.main(["tfpar-train", *TINY, *flags, f"--model_dir={tmp_path / 'run'}"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert expected in line, line
    assert not os.path.exists(tmp_path / "run")  # refused before anything is written


def test_a_stage_on_another_task_is_not_this_tasks_cpu():
    here, there = "/job:worker/replica:0/task:0/device:CPU:0", "/job:worker/replica:0/task:1/device:CPU:0"
    assert not placement.same_device(here, there)
    assert placement.same_device(here, "/cpu:0") and placement.same_device(there, "/device:CPU:0")
    assert not placement.same_device("/cpu:0", "/cpu:1")


# ----- real processes ------------------------------------------------------------------------


def _summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


def _weights(model_dir):
    import h5py

    arrays = []
    with h5py.File(os.path.join(model_dir, "best.weights.h5"), "r") as f:
        f.visititems(lambda name, obj: arrays.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _single_process(model_dir, flags):
    code, out, err = run_reaped(tfpar_train_command() + TINY + flags + [f"--model_dir={model_dir}"], 600,
                                env=quiet_env())
    assert code == 0, (out + err)[-3000:]
    return _summary(model_dir)


def _launch(model_dir, workers, flags, extra=(), timeout=600):
    command = LAUNCH + ["--workers", str(workers), "--timeout", str(timeout - 30), *extra, "--",
                        *tfpar_train_command(), *TINY, *flags, f"--model_dir={model_dir}", "--cluster_timeout=40"]
    return run_reaped(command, timeout, env=quiet_env(), merge_output=True)


def _assert_same_run(model_dir, ref_dir, keys=("train_loss", "val_loss")):
    got, ref = _summary(model_dir), _summary(ref_dir)
    for key in keys:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    got_w, ref_w = _weights(model_dir), _weights(ref_dir)
    assert [n for n, _ in got_w] == [n for n, _ in ref_w] and len(got_w) > 20
    for (name, a), (_, b) in zip(got_w, ref_w):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    return got, ref


@pytest.fixture(scope="module")
def two_stage_reference(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("pipeline_ref") / "run")
    _single_process(model_dir, ["--stages=2"])
    return model_dir


@pytest.mark.slow
def test_two_stages_on_two_tasks_train_as_one_process(tmp_path, two_stage_reference):
    model_dir = str(tmp_path / "run")
    code, out, _ = _launch(model_dir, 2, ["--stages=2", "--tensorboard", "--profile_steps=6,7"])
    assert code == 0, out[-4000:]
    assert "worker-1 serves stage 1 of copy 0" in out
    got, _ = _assert_same_run(model_dir, two_stage_reference)
    # The chief's trace and worker-1's (taken through its server) give both stages' busy and idle time.
    timeline = got["pipeline"]["timeline"]
    assert set(timeline["busy_ms"]) == set(timeline["idle_ms"]) == {"copy0/stage0", "copy0/stage1"}, timeline
    assert all(0 < timeline["busy_ms"][k] <= timeline["step_ms"] for k in timeline["busy_ms"])
    piped = got["pipeline"]
    task = "/job:worker/replica:0/task:{}/device:CPU:0"
    assert piped["devices"] == [task.format(0), task.format(1)]
    # The variables (and the optimizer's slots) really live on both tasks: TF says where each one is.
    assert set(piped["variable_devices"]) == {task.format(0), task.format(1)}, piped["variable_devices"]
    assert {task.format(0), task.format(1)} <= set(piped["optimizer_variable_devices"])
    assert got["optimizer_updates"] == 12
    assert not os.path.exists(os.path.join(model_dir, "summary.worker-1.json"))  # the server writes nothing


@pytest.mark.slow
def test_two_stages_times_two_copies_on_four_tasks_train_as_one_process(tmp_path):
    ref_dir, model_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    flags = ["--stages=2", "--pipeline_replicas=2", "--epochs=1", "--backup_freq=none"]
    _single_process(ref_dir, flags)
    code, out, _ = _launch(model_dir, 4, flags)
    assert code == 0, out[-4000:]
    got, _ = _assert_same_run(model_dir, ref_dir)
    assert len(got["pipeline"]["devices"]) == 4 and got["pipeline"]["devices"][3].endswith("task:3/device:CPU:0")
    # Each stage's weights stay with copy 0's stage (tasks 0 and 1); copies 1 and 2 only compute.
    assert set(got["pipeline"]["variable_devices"]) == {got["pipeline"]["devices"][0], got["pipeline"]["devices"][1]}


@pytest.mark.slow
def test_a_stage_task_that_stops_answering_ends_the_run_and_restarts_resume_to_the_same_weights(
        tmp_path, two_stage_reference):
    import subprocess

    from test_fault_tolerance import _children_with_task, _wait_for

    model_dir = str(tmp_path / "run")
    first_backup = os.path.join(model_dir, "backup", "step-000000002")
    command = LAUNCH + ["--workers", "2", "--restarts", "1", "--timeout", "570", "--", *tfpar_train_command(),
                        *TINY, "--stages=2", f"--model_dir={model_dir}", "--cluster_timeout=40"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=quiet_env())
    try:
        assert _wait_for(lambda: os.path.isdir(first_backup), 400, proc), "no backup at step 2 in time"
        victims = _children_with_task(proc.pid, 1)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGSTOP)  # hung, not dead: only the chief's heartbeat can notice
        out, _ = proc.communicate(timeout=570)
    finally:
        reap(proc)
    assert proc.returncode == 0, out[-4000:]
    lost = [line for line in out.splitlines() if "lost contact with pipeline task" in line]
    assert len(lost) == 1 and "worker-1 (127.0.0.1:" in lost[0] and "stage 1 of copy 0" in lost[0], out[-4000:]
    assert f"worker-0 exited with {peers.EXIT_UNREACHABLE}; restarting all tasks (restart 1)" in out
    # The resumed run's last epoch may be a part of one, so its mean train loss is not comparable.
    got, _ = _assert_same_run(model_dir, two_stage_reference, keys=("val_loss",))
    assert got["resumed_from"]["step"] >= 2, got["resumed_from"]
    assert got["optimizer_updates"] == 12
