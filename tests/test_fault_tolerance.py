"""Kill-and-resume with real processes: SIGKILL under the launcher, SIGTERM, unreachable peers.

Every process runs in its own session and is killed with its group in a
``finally``; every wait is bounded.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import reap as _reap
from tfpar.runtime import launcher, peers, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, os.path.join(ROOT, "scripts", "train.py")]
LAUNCH = [sys.executable, "-m", "tfpar.launcher"]
TINY = ["--model=resnet18", "--width_multiplier=0.125", "--batch_size=32", "--steps_per_epoch=4",
        "--validation_steps=1", "--tensorboard=false", "--verbose=0"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def _start(argv, **kwargs):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_env(), **kwargs)


def _finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _reap(proc)
    return proc.returncode, out


def _wait_for(predicate, timeout, proc=None, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _children_with_task(parent_pid, index):
    """PIDs of ``parent_pid``'s children whose TF_CONFIG task index is ``index``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        raw = env.get(b"TF_CONFIG")
        if raw and json.loads(raw)["task"]["index"] == index:
            found.append(int(name))
    return found


def _summary(model_dir, name="summary.json"):
    with open(os.path.join(model_dir, name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_sigkill_one_worker_mid_epoch_2_launcher_restarts_and_run_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    mid_epoch_2 = os.path.join(model_dir, "backup", "step-000000006")  # backups every 2 steps; 4 per epoch
    launcher = _start(LAUNCH + ["--workers", "2", "--restarts", "1", "--timeout", "420", "--",
                                *TRAIN, "--strategy=multi_worker", *TINY, "--epochs=4", "--backup_freq=2",
                                f"--model_dir={model_dir}", "--cluster_timeout=120"])
    try:
        assert _wait_for(lambda: os.path.isdir(mid_epoch_2), 300, launcher), "no backup at step 6 in time"
        victims = _children_with_task(launcher.pid, 1)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        code, out = _finish(launcher, 420)
    finally:
        _reap(launcher)
    assert code == 0, out[-3000:]
    assert "worker-1 exited with 137; restarting all tasks (restart 1)" in out
    chief = _summary(model_dir)
    # Resumed from the mid-epoch-2 backup, not from scratch, and finished all 4 epochs.
    assert chief["resumed_from"]["step"] == 6 and chief["resumed_from"]["epoch"] == 1, chief["resumed_from"]
    assert chief["optimizer_updates"] == 16
    assert chief["epochs_done"] == 4  # the whole run: epoch 1 before the kill, epochs 2 (its last 2 steps) to 4 after
    workers = [_summary(model_dir, f"summary.worker-{i}.json") for i in range(2)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert all(w["resumed_from"]["step"] == 6 for w in workers)
    assert not os.path.exists(os.path.join(model_dir, "backup"))  # removed after the successful finish


@pytest.mark.slow
def test_sigterm_saves_a_backup_and_the_same_command_resumes_at_that_step(tmp_path):
    model_dir = str(tmp_path / "run")
    command = TRAIN + ["--strategy=one_device", *TINY, "--epochs=3", f"--model_dir={model_dir}"]
    reference = _start(TRAIN + ["--strategy=one_device", *TINY, "--epochs=3", f"--model_dir={tmp_path / 'ref'}"])
    first = _start(command)
    try:
        lines = []

        def epoch_1_done():
            line = first.stdout.readline()
            lines.append(line)
            return line.startswith("epoch 1/")

        assert _wait_for(epoch_1_done, 240, first, poll=0), "".join(lines)
        first.send_signal(signal.SIGTERM)
        code, out = _finish(first, 120)
        out = "".join(lines) + out
        assert code == preemption.EXIT_PREEMPTED, out[-3000:]
        assert "preempted (SIGTERM): backup saved at step" in out
        saved = int(out.split("backup saved at step ")[1].split(";")[0])
        assert 4 <= saved < 12
        assert sorted(os.listdir(os.path.join(model_dir, "backup")))[-1] == f"step-{saved:09d}"
        assert "Traceback" not in out

        code, out = _finish(_start(command), 240)
        ref_code, ref_out = _finish(reference, 240)
    finally:
        _reap(first)
        _reap(reference)
    assert code == 0, out[-3000:]
    assert ref_code == 0, ref_out[-3000:]
    summary = _summary(model_dir)
    assert summary["resumed_from"]["step"] == saved
    assert summary["optimizer_updates"] == 12
    # The interruption changed nothing: same bits as the run that was never stopped.
    assert summary["weights_sha256"] == _summary(str(tmp_path / "ref"))["weights_sha256"]


@pytest.mark.slow
def test_a_worker_that_cannot_reach_the_others_exits_with_a_clear_error(tmp_path):
    ports = launcher.free_ports(2)  # worker-0 is never started
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 1}}
    proc = subprocess.Popen(TRAIN + ["--strategy=multi_worker", *TINY, "--cluster_timeout=10",
                                     f"--model_dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(_env(), TF_CONFIG=json.dumps(tf_config)))
    started = time.monotonic()
    code, out = _finish(proc, 180)
    assert code == peers.EXIT_UNREACHABLE, out[-3000:]
    assert ("tfpar-train: error: worker-1 could not reach the other workers within 10 s; check that every task "
            "is started and that the TF_CONFIG addresses are reachable.") in out
    assert "Traceback" not in out
    assert time.monotonic() - started < 170


_FLAKY_WORKER = """
import json, os, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with open(sys.argv[1], "a") as f:
    f.write(f"{task} {os.environ['TF_CONFIG']}\\n")
if task == 1:
    sys.exit(int(sys.argv[2]))
time.sleep(1)
"""


@pytest.mark.parametrize("exit_code,restarts,expected_code,expected_starts", [
    (75, 2, 75, 3),  # preempted every time: restarted twice, then the launcher gives up with 75
    (137, 1, 137, 2),
    (2, 3, 2, 1),  # a usage error is never restarted
])
def test_launcher_restarts_the_whole_cluster_up_to_k_times(tmp_path, exit_code, restarts, expected_code,
                                                           expected_starts):
    log = tmp_path / "starts"
    proc = _start(LAUNCH + ["--workers", "2", "--restarts", str(restarts), "--timeout", "120", "--",
                            sys.executable, "-c", _FLAKY_WORKER, str(log), str(exit_code)])
    code, out = _finish(proc, 150)
    assert code == expected_code, out
    starts = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert sum(1 for task, _ in starts if task == "1") == expected_starts
    assert out.count("restarting all tasks") == expected_starts - 1
    # Each restart is a new cluster on fresh ports, and both tasks share it.
    clusters = {json.dumps(json.loads(tf_config)["cluster"]) for _, tf_config in starts}
    assert len(clusters) == expected_starts


def test_lost_peer_is_named_from_tfs_heartbeat_errors():
    from tfpar.runtime import cluster

    spec = {"worker": ["198.18.0.1:2222", "198.18.0.2:2222", "198.18.0.3:2222"]}
    worker0 = cluster.from_tf_config(json.dumps({"cluster": spec, "task": {"type": "worker", "index": 0}}))
    worker2 = cluster.from_tf_config(json.dumps({"cluster": spec, "task": {"type": "worker", "index": 2}}))
    # As TF 2.21 words them (seen in tests/test_netns.py): on the leader, and on a worker cut off from it.
    unhealthy = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
                 "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n/job:worker/replica:0/task:2\n"
                 "The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. "
                 "preemption, eviction) to debug further.")
    cut_off = "Collective ops is aborted by: Deadline Exceeded\nRPC: /tensorflow.CoordinationService/Heartbeat"
    assert peers.lost_peers(unhealthy, worker0) == ["worker-1", "worker-2"]
    assert peers.lost_peers(unhealthy, worker2) == ["worker-1"]  # never itself
    assert peers.lost_peers(cut_off, worker2) == ["worker-0"]  # the coordination leader
    assert peers.lost_peers("Socket closed", worker2) == []
    # A peer SIGKILLed mid-collective, before any heartbeat is missed (seen in tests/test_netns.py).
    reset = ("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information "
             "from remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:\n"
             ":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"recvmsg:Connection reset by peer\"}")
    assert peers.lost_peers(reset, worker0) == ["worker-1"]
    aborted = reset.replace("grpc_status:14", "grpc_status:10")  # an abort relayed by a peer that is alive
    assert peers.lost_peers(aborted, worker2) == []
    assert peers.heartbeat_timeout(300) == 10 and peers.heartbeat_timeout(20) == 5


def _worker(index, workers=2):
    from tfpar.runtime import cluster

    spec = {"worker": [f"198.18.0.{i + 1}:2222" for i in range(workers)]}
    return cluster.from_tf_config(json.dumps({"cluster": spec, "task": {"type": "worker", "index": index}}))


LOST_TAIL = "exiting with 69 so the whole cluster is restarted and resumes from the last backup.\n"
UNREACHABLE_TAIL = "; check that every task is started and that the TF_CONFIG addresses are reachable.\n"


def test_peers_that_do_not_register_in_time_end_the_task_with_one_line_and_exit_69(capsys, monkeypatch):
    import tensorflow as tf
    from tfpar.runtime import cluster

    configured = []
    monkeypatch.setattr(peers, "_configure_register_timeout", lambda info, seconds: configured.append(seconds))
    with pytest.raises(peers.Unreachable) as caught:
        with peers.within(10, _worker(1)):
            raise tf.errors.DeadlineExceededError(None, None, "registration timed out")
    assert caught.value.code == peers.EXIT_UNREACHABLE == 69 and configured == [10]
    assert capsys.readouterr().err == ("tfpar-train: error: worker-1 could not reach the other workers within 10 s"
                                       + UNREACHABLE_TAIL)
    with pytest.raises(tf.errors.DeadlineExceededError):  # one process: no deadline to configure, no line
        with peers.within(10, cluster.ClusterInfo()):
            raise tf.errors.DeadlineExceededError(None, None, "not about peers")
    assert configured == [10] and capsys.readouterr().err == ""


def test_connect_retries_until_its_deadline_then_names_what_it_could_not_reach(capsys, monkeypatch):
    import tensorflow as tf

    calls = []

    def refuse_twice(resolver, job_name, task_index, protocol, make_master_device_default):
        calls.append((job_name, task_index))
        if len(calls) <= 2:
            raise tf.errors.UnavailableError(None, None, "connection refused\nmore detail")

    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", refuse_twice)
    peers.connect(_worker(0), 60)  # a retry a second
    assert calls == [("worker", 0)] * 3  # retried, as this task, until it connected
    assert capsys.readouterr().err == ""

    calls.clear()
    with pytest.raises(peers.Unreachable) as caught:
        peers.connect(_worker(0), 0.5, "the pipeline's stage tasks")
    assert caught.value.code == 69 and len(calls) == 2  # refused, retried a second later, past the deadline
    assert capsys.readouterr().err == ("tfpar-train: error: worker-0 could not reach the pipeline's stage tasks "
                                       "within 0.5 s (connection refused)" + UNREACHABLE_TAIL)


def test_a_peer_lost_during_collectives_ends_the_task_with_one_line_naming_it(capsys):
    import tensorflow as tf
    from tfpar.runtime import cluster

    unhealthy = ("The following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n"
                 "The tasks have crashed.")
    with pytest.raises(peers.Unreachable) as caught:
        with peers.stay(_worker(0), 20):
            raise tf.errors.UnavailableError(None, None, unhealthy)
    assert caught.value.code == 69
    assert capsys.readouterr().err == ("tfpar-train: error: worker-0 lost contact with worker-1 (198.18.0.2:2222) "
                                       "during training (heartbeat timeout 5 s); " + LOST_TAIL)
    with pytest.raises(tf.errors.UnavailableError):  # one process: no peers to lose
        with peers.stay(cluster.ClusterInfo(), 20):
            raise tf.errors.UnavailableError(None, None, unhealthy)
    with pytest.raises(ValueError):  # not a peer-loss error
        with peers.stay(_worker(0), 20):
            raise ValueError("a bug")
    assert capsys.readouterr().err == ""


class _SilentHeartbeat:
    """A heartbeat that never finds a lost task (a real one would have exited the process)."""
    timeout = 0.1
    closed = False

    def close(self):
        self.closed = True


def test_with_a_heartbeat_a_failed_step_waits_for_its_verdict_and_then_is_the_news():
    import tensorflow as tf

    heartbeat = _SilentHeartbeat()
    started = time.monotonic()
    with pytest.raises(tf.errors.InternalError):
        with peers.stay(_worker(0), 20, heartbeat):
            raise tf.errors.InternalError(None, None, "a step failed")
    assert time.monotonic() - started >= heartbeat.timeout + 2.0 and heartbeat.closed
    heartbeat = _SilentHeartbeat()
    with peers.stay(_worker(0), 20, heartbeat):
        pass
    assert heartbeat.closed  # the heartbeat ends with the training it guards


_HEARTBEAT = """
import sys, time
import tensorflow as tf
from tfpar.runtime import cluster, peers
tf.config.set_soft_device_placement(False)
info = cluster.from_tf_config(sys.argv[1])
peers.Heartbeat(info, {"the local CPU": "/job:localhost/replica:0/task:0/device:CPU:0",
                       "pipeline task worker-1 (198.18.0.2:2222, stage 1 of copy 0)":
                           "/job:worker/replica:0/task:1/device:CPU:0"}, 1.0)
time.sleep(120)
"""


@pytest.mark.slow  # a real process
def test_a_heartbeat_names_the_task_that_does_not_answer_and_exits_69():
    tf_config = json.dumps({"cluster": {"worker": ["198.18.0.1:2222", "198.18.0.2:2222"]},
                            "task": {"type": "worker", "index": 0}})
    proc = subprocess.Popen([sys.executable, "-c", _HEARTBEAT, tf_config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=_env())
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _reap(proc)
    assert proc.returncode == 69, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("tfpar-train: error:")]
    assert lines == ["tfpar-train: error: worker-0 lost contact with pipeline task worker-1 (198.18.0.2:2222, stage 1 "
                     "of copy 0): no answer within 1 s; " + LOST_TAIL.strip()], err[-3000:]


RECORD = os.path.join(ROOT, "tests", "record_examples.py")


def _flat_png(value):
    """A flat 12x12 PNG whose red value is the example's id (tests/record_examples.py reads it back)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.zeros((12, 12, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = value, 90
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_source(root, kind):
    """24 training examples with ids 1..24 (4 classes) and 4 validation ones, as PNG folders or TFRecords."""
    examples = {"train": [(i, i % 4) for i in range(1, 25)], "val": [(100 + c, c) for c in range(4)]}
    if kind == "folder":
        for split, items in examples.items():
            for value, label in items:
                os.makedirs(root / split / f"class{label}", exist_ok=True)
                (root / split / f"class{label}" / f"{value}.png").write_bytes(_flat_png(value))
        return f"folder:{root}"
    import tensorflow as tf

    def record(value, label):
        return tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_flat_png(value)])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        })).SerializeToString()

    os.makedirs(root)
    files = {"train-00000-of-00002": examples["train"][:12], "train-00001-of-00002": examples["train"][12:],
             "validation-00000-of-00001": examples["val"]}
    for name, items in files.items():
        with tf.io.TFRecordWriter(str(root / name)) as writer:
            for value, label in items:
                writer.write(record(value, label))
    return f"tfrecord:{root}/*"


def _steps(path):
    return [[int(v) for v in line.split()] for line in open(path).read().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_killed_mid_epoch_on_files_resumes_at_the_exact_example(tmp_path, kind):
    """SIGKILL mid-epoch 2 on real files; the resumed run trains on the very batches an unstopped run trains on."""
    spec = _write_source(tmp_path / "data", kind)
    flags = ["--model=resnet18", "--width_multiplier=0.125", "--image_size=16", "--num_classes=4",
             f"--data={spec}", "--batch_size=8", "--epochs=3", "--validation_steps=1", "--tensorboard=false",
             "--checkpoint_best=false", "--backup_freq=2", "--verbose=0"]  # 24 / 8 = 3 steps per epoch
    reference = _start([sys.executable, RECORD, str(tmp_path / "ref.ids"), "0", "--", *flags,
                        f"--model_dir={tmp_path / 'ref'}"])
    command = [sys.executable, RECORD, str(tmp_path / "run.ids"), "0", "--", *flags, f"--model_dir={tmp_path / 'run'}"]
    killed = _start(command[:3] + ["5"] + command[4:])  # dies in step 5 (epoch 2), after the backup of step 4
    try:
        code, out = _finish(killed, 300)
        assert code == -signal.SIGKILL, out[-3000:]
        code, out = _finish(_start(command), 300)
        ref_code, ref_out = _finish(reference, 300)
    finally:
        _reap(killed)
        _reap(reference)
    assert code == 0 and ref_code == 0, (out + ref_out)[-3000:]
    resumed = _summary(str(tmp_path / "run"))["resumed_from"]
    assert (resumed["step"], resumed["epoch"], resumed["batch"]) == (4, 1, 1)  # mid-epoch 2
    ref, run = _steps(tmp_path / "ref.ids"), _steps(tmp_path / "run.ids")
    assert len(ref) == 9 and len(run) == 5 + 5  # 5 steps before the kill (the 5th lost), 5 after the resume
    trained = run[:4] + run[5:]  # the killed process's steps 1-4 (backed up), then the resumed ones
    assert trained == ref  # the same examples in the same order, step by step
    for epoch in range(3):  # so each epoch trained on every example exactly once, as the unstopped run did
        seen = sorted(v for step in trained[3 * epoch:3 * epoch + 3] for v in step)
        assert seen == list(range(1, 25))
