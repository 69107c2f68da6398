"""Elastic training: a backup resumes on another number of workers with the same updates (tfpar.runtime.elastic).

The slow tests train real worker processes under ``tfpar-launch`` with the
tiny BN-free model of ``tests/elastic_worker.py``.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import reap as _reap
from tfpar.core import backup_store as store
from tfpar.runtime import elastic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = [sys.executable, os.path.join(ROOT, "tests", "elastic_worker.py")]
LAUNCH = [sys.executable, "-m", "tfpar.launcher"]


def _backup(num_workers=3, run=None, epoch=2, batch=1):
    return store.Backup("/b/step-000000007", 7, epoch, batch, num_workers, {"model": "m"},
                        {"family": "data_parallel", "examples_per_update": 48, "examples": 336} if run is None else run)


# ------------------------------------------------------------------ fast: the rules


def test_the_update_is_kept_and_cut_into_the_fewest_accumulation_steps():
    assert elastic.plan_batch(48, 2) == (48, 1)
    assert elastic.plan_batch(48, 3) == (48, 1)
    assert elastic.plan_batch(48, 2, max_per_replica=12) == (24, 2)  # 2 micro-batches of 12 per replica
    assert elastic.plan_batch(48, 1, max_per_replica=10) == (8, 6)  # 5 does not divide 48: 6 of 8
    assert elastic.plan_batch(48, 2, accum=2) == (24, 2)  # the run's own accumulation is kept when it fits
    with pytest.raises(ValueError, match=r"^48 examples per update cannot be split evenly over 5 replicas; resume on "
                                         r"a number of replicas that divides 48\.$"):
        elastic.plan_batch(48, 5)
    assert elastic.plan_batch(48, 4, max_per_replica=5) == (16, 3)


def test_a_data_parallel_backup_resumes_on_another_worker_count_but_not_a_parameter_server_one():
    elastic.check(_backup(3), "/b", "data_parallel", 2)  # shrink: allowed
    elastic.check(_backup(2), "/b", "data_parallel", 3)  # grow: allowed
    elastic.check(_backup(3), "/b", "data_parallel", 3, wanted_update=48)
    ps = _backup(3, {"family": "parameter_server", "examples_per_update": 48})
    with pytest.raises(ValueError, match=r"^The backup in /b was written by 3 worker\(s\) but this cluster has 2, and "
                                         r"only one_device, mirrored and multi_worker backups resume on another "
                                         r"number of workers; restart with 3 workers"):
        elastic.check(ps, "/b", "parameter_server", 2)
    old = _backup(3, {})  # written before tfpar recorded the run: not elastic
    with pytest.raises(ValueError, match="written by 3 worker"):
        elastic.check(old, "/b", "data_parallel", 2)


def test_another_family_or_global_batch_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"^The backup in /b was written by a data_parallel run but this run is "
                                         r"pipeline; use a new model_dir or backup_dir, or delete that backup to "
                                         r"start over\.$"):
        elastic.check(_backup(3), "/b", "pipeline", 3)
    with pytest.raises(ValueError, match=r"^The backup in /b trained with 48 examples per update but this run asks "
                                         r"for 64; resume with the same --batch_size and --grad_accum_steps, or pass "
                                         r"--allow_batch_change to continue with the new batch\.$"):
        elastic.check(_backup(3), "/b", "data_parallel", 2, wanted_update=64)
    elastic.check(_backup(3), "/b", "data_parallel", 2, wanted_update=64, allow_batch_change=True)


def test_the_resume_line_names_the_position_the_workers_and_the_batch():
    assert elastic.resume_line(_backup(3), 2, 48, 1) == (
        "resuming epoch 3 step 1 on 2 worker(s) (backup written by 3): global batch 48 kept as 24 per worker")
    assert elastic.resume_line(_backup(3), 2, 24, 2) == (
        "resuming epoch 3 step 1 on 2 worker(s) (backup written by 3): global batch 48 kept as "
        "2 x 12 per worker (gradient accumulation)")


def test_a_backup_records_what_an_elastic_resume_needs(tmp_path):
    made = store.write(str(tmp_path), lambda prefix: open(prefix + ".index", "w").write("x"), step=7, epoch=2,
                       batch=1, num_workers=3, signature={"model": "m"},
                       run={"family": "data_parallel", "examples_per_update": 48, "examples": 336})
    again = store.read(made.path)
    assert again.run == {"family": "data_parallel", "examples_per_update": 48, "examples": 336}
    assert again.num_workers == 3 and (again.epoch, again.batch, again.step) == (2, 1, 7)


# ------------------------------------------------------------------ slow: real workers


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)


def _run(argv, timeout, **env):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_env(**env))
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _reap(proc)
    return proc.returncode, out


def _launch(workers, record, kill_at, flags, *launcher_flags, timeout=300, **env):
    return _run(LAUNCH + ["--workers", str(workers), "--timeout", str(timeout), *launcher_flags, "--",
                          *WORKER, record, str(kill_at), "--", "--strategy=multi_worker", *flags], timeout + 30, **env)


def _weights(model_dir, task=0):
    with np.load(os.path.join(model_dir, f"weights.{task}.npz")) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def _summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


DIGITS = ["--image_size=8", "--batch_size=48", "--steps_per_epoch=3", "--epochs=4", "--validation_steps=0",
          "--learning_rate=2.0", "--lr_schedule=cosine", "--tensorboard=false", "--checkpoint_best=false",
          "--verbose=0", "--backup_freq=2", "--cluster_timeout=60"]


@pytest.mark.slow
def test_3_workers_then_2_then_3_equal_one_uninterrupted_run(tmp_path):
    """Killed after epoch 2 on 3 workers, mid-epoch 3 on 2 (a shrink), finished on 3 (a grow): the weights of a
    run that was never stopped, to 1e-5, and every example counted once."""
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    code, out = _run(WORKER + ["-", "0", "--", "--strategy=one_device", *DIGITS, f"--model_dir={ref_dir}"], 240)
    assert code == 0, out[-3000:]
    flags = [*DIGITS, f"--model_dir={run_dir}"]
    code, out = _launch(3, "-", 7, flags)  # dies in step 7 (epoch 3); the backup of step 6 ends epoch 2
    assert code == 128 + signal.SIGKILL, out[-3000:]
    code, out = _launch(2, "-", 4, flags)  # resumes at step 6 on 2 workers; dies in step 10, backup at 8
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert ("resuming epoch 3 step 0 on 2 worker(s) (backup written by 3): global batch 48 kept as 24 per worker"
            in out), out[-3000:]
    code, out = _launch(3, "-", 0, flags)  # resumes mid-epoch 3 (step 8) on 3 workers and finishes
    assert code == 0, out[-3000:]
    assert "resuming epoch 3 step 2 on 3 worker(s) (backup written by 2): global batch 48 kept as 16 per worker" in out
    summary, ref = _summary(run_dir), _summary(ref_dir)
    assert summary["resumed_from"] == {"epoch": 2, "batch": 2, "step": 8, "workers": 2,
                                       "path": os.path.join(run_dir, "backup", "step-000000008")}
    assert summary["optimizer_updates"] == ref["optimizer_updates"] == 12
    assert summary["epochs_done"] == ref["epochs_done"] == 4
    assert summary["examples_seen"] == ref["examples_seen"] == 12 * 48
    for got, want in zip(_weights(run_dir), _weights(ref_dir), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(_weights(ref_dir)[-1], 0)


@pytest.mark.slow
def test_a_worker_gone_for_good_is_left_out_and_every_folder_example_is_trained_once_per_epoch(tmp_path):
    """--min_workers: worker 1 is killed mid-epoch 2, then fails at every start; the launcher restarts the
    cluster without it, the run resumes on 1 worker, and each epoch trains each of the 24 images exactly once."""
    from test_fault_tolerance import _write_source

    spec = _write_source(tmp_path / "data", "folder")
    record, model_dir = str(tmp_path / "ids"), str(tmp_path / "run")
    flags = ["--image_size=12", "--num_classes=4", f"--data={spec}", "--batch_size=8", "--epochs=3",
             "--validation_steps=0", "--tensorboard=false", "--checkpoint_best=false", "--backup_freq=2",
             "--verbose=0", "--cluster_timeout=60", f"--model_dir={model_dir}"]  # 24 / 8 = 3 steps per epoch
    code, out = _launch(2, record, 5, flags, "--restarts", "1", "--min_workers", "1",
                        TFPAR_TEST_KILL_WORKER="1", TFPAR_TEST_FAIL_AT_START=f"1/2:{record}.killed")
    assert code == 0, out[-4000:]
    assert "[launcher] worker-1 exited with 137; restarting all tasks (restart 1)" in out
    assert "[launcher] worker-1 failed again after a restart; left out: workers worker-0, worker-1 -> worker-0" in out
    summary = _summary(model_dir)
    resumed = summary["resumed_from"]
    assert resumed["workers"] == 2 and summary["num_workers"] == 1 and resumed["step"] in (2, 4), resumed
    line = (f"resuming epoch {resumed['epoch'] + 1} step {resumed['batch']} on 1 worker(s) (backup written by 2): "
            f"global batch 8 kept as 8 per worker")
    assert line in out, out[-4000:]
    assert summary["epochs_done"] == 3 and summary["examples_seen"] == 9 * 8 and summary["optimizer_updates"] == 9

    def lines(name):
        return [[int(v) for v in row.split()] for row in open(f"{record}.{name}").read().splitlines()]

    two = [a + b for a, b in zip(lines("2.0"), lines("2.1"))][:resumed["step"]]  # global steps before the backup
    trained = two + lines("1.0")
    assert len(trained) == 9, [len(two), len(lines("1.0"))]
    for epoch in range(3):
        assert sorted(v for step in trained[3 * epoch:3 * epoch + 3] for v in step) == list(range(1, 25)), epoch


def test_the_training_stream_is_one_for_every_worker_count(tmp_path):
    """Digits and folder streams: each epoch a permutation; a resume skips exactly; worker slices make the batch."""
    import tensorflow as tf

    from tfpar.run import data
    from tfpar.run.config import TrainConfig

    table = (np.arange(1, 25), np.arange(1, 25) % 4)
    whole = [int(v) for v, _ in data._shuffled(table, 3, 0).take(72)]
    for epoch in range(3):
        assert sorted(whole[24 * epoch:24 * epoch + 24]) == list(range(1, 25))
    assert whole[:24] != whole[24:48]  # each epoch in its own order
    assert [int(v) for v, _ in data._shuffled(table, 3, 20).take(30)] == whole[20:50]  # a resume skips exactly
    ds = tf.data.Dataset.from_tensor_slices(np.arange(24))
    parts = [[int(v) for v in data._worker_slice(ds, 6, 3, i)] for i in range(3)]
    assert [parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2] + parts[2][2 * k:2 * k + 2] for k in range(4)] == [
        list(range(6 * k, 6 * k + 6)) for k in range(4)]  # step k of 3 workers = global batch k
    with pytest.raises(ValueError, match=r"^A batch of 8 does not split evenly over 3 workers; use a multiple of 3\.$"):
        data._worker_slice(ds, 8, 3, 0)
    cfg = TrainConfig(image_size=8, batch_size=12, steps_per_epoch=2)
    one = next(iter(data.make(cfg, 12, skip_examples=36).train))[1].numpy().tolist()
    assert one == next(iter(data.make(cfg, 4, micro_batches=3, skip_batches=3).train))[1].numpy().tolist()


GONE = """
import json, os, sys, time
task = json.loads(os.environ["TF_CONFIG"])
index, size = task["task"]["index"], len(task["cluster"]["worker"])
if (index, size) == (2, 3):
    sys.exit(1)  # its host is gone: it fails at every start
time.sleep(30 if size == 3 else 0)  # the others wait for it, or finish on a smaller cluster
"""


@pytest.mark.parametrize("minimum, code", [(2, 0), (3, 69)])
def test_min_workers_leaves_out_a_worker_that_fails_again_after_its_restart(minimum, code):
    got, out = _run(LAUNCH + ["--workers", "3", "--restarts", "1", "--min_workers", str(minimum), "--timeout", "60",
                              "--", sys.executable, "-c", GONE], 90)
    assert got == code, out
    assert "[launcher] worker-2 exited with 1; restarting all tasks (restart 1)" in out
    if code == 0:
        assert "[launcher] worker-2 failed again after a restart; left out: workers worker-0, worker-1, worker-2 -> " \
               "worker-0, worker-1\n" in out
    else:
        assert "[launcher] worker-2 failed again after a restart; 2 worker(s) would be below --min_workers 3; " \
               "lost: worker-2; stopping all tasks\n" in out


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2", "--restarts", "1", "--min_workers", "3"],
     "--min_workers must be between 1 and --workers (2), got 3"),
    (["--workers", "2", "--min_workers", "1"], "--min_workers needs --restarts of at least 1 and no --ps"),
])
def test_min_workers_mistakes_are_one_sentence_and_exit_2(flags, message):
    got, out = _run(LAUNCH + flags + ["--", "true"], 60)
    assert got == 2 and f"tfpar-launch: error: {message}" in out, out


@pytest.mark.parametrize("flags, message", [
    (dict(batch_size=32), "The backup in {b} trained with 48 examples per update but this run asks for 32; resume "
                          "with the same --batch_size and --grad_accum_steps, or pass --allow_batch_change to "
                          "continue with the new batch."),
    (dict(strategy="pipeline", batch_size=48, micro_batches=4),
     "The backup in {b} was written by a data_parallel run but this run is pipeline; use a new model_dir or "
     "backup_dir, or delete that backup to start over."),
])
def test_an_incompatible_backup_is_refused_before_anything_is_written(tmp_path, flags, message):
    from tfpar.run import driver
    from tfpar.run.config import TrainConfig
    from tfpar.runtime import backup

    config = TrainConfig(model="resnet18", image_size=8, steps_per_epoch=2, epochs=1, tensorboard=False,
                         model_dir=str(tmp_path / "run"), **flags)
    backup_dir = tmp_path / "run" / "backup"
    store.write(str(backup_dir), lambda prefix: open(prefix + ".index", "w").write("x"), step=3, epoch=1, batch=1,
                num_workers=3, signature=backup.signature(config),
                run={"family": "data_parallel", "examples_per_update": 48, "examples": 144})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError) as err:
        driver.run(config, print_fn=None)
    assert str(err.value) == message.format(b=backup_dir)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_worker_that_takes_no_connection_is_named_lost():
    import socket

    from tfpar.runtime import cluster, launcher, peers

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed = launcher.free_ports(1)[0]
        info = cluster.ClusterInfo(task_type="chief", cluster_spec={
            "chief": ["127.0.0.1:1"], "worker": [f"127.0.0.1:{listening.getsockname()[1]}", f"127.0.0.1:{closed}"]})
        assert peers.unanswered(info) == ["worker-1"]


def test_ray_takes_a_worker_count_or_an_elastic_min_max():
    from tfpar.run import ray as tfpar_ray

    assert tfpar_ray.max_workers(3) == 3 and tfpar_ray.max_workers((2, 4)) == 4
    for bad in (0, (3, 2), (0, 2), (1, 2, 3), True, "2:3"):
        with pytest.raises(ValueError, match=r"^--workers must be a positive integer, or \(min, max\) with "
                                             r"1 <= min <= max, with --launcher=ray; got "):
            tfpar_ray.max_workers(bad)


def test_tfpar_train_takes_workers_min_max_for_ray():
    from tfpar.run import cli
    from tfpar.run.config import TrainConfig

    assert cli.config_from_flags(["tfpar-train", "--launcher=ray", "--workers=2:4"]).worker_counts() == (2, 4)
    assert cli.config_from_flags(["tfpar-train", "--launcher=ray", "--workers=3"]).worker_counts() == 3
    assert TrainConfig(launcher="ray", workers=2).validate().worker_counts() == 2
    for bad in ("3:2", "0", "2:", "x", 0):
        with pytest.raises(ValueError, match=r"^workers must be a positive integer, or MIN:MAX with 1 <= MIN <= MAX, "
                                             r"with launcher=ray; got "):
            TrainConfig(launcher="ray", workers=bad).validate()



@pytest.mark.slow
def test_a_host_added_to_the_hosts_file_joins_at_the_next_restart(tmp_path):
    """--hosts FILE --max_workers 3: two hosts listed, worker 0 adds a third and dies in step 5; the restart reads
    FILE again and 3 workers resume the step-4 backup written by 2, with the same global batch of 48."""
    hosts, model_dir = tmp_path / "hosts", str(tmp_path / "run")
    hosts.write_text("host-a\n# the third host is down\nhost-b\n")
    code, out = _run(LAUNCH + ["--hosts", str(hosts), "--max_workers", "3", "--restarts", "1", "--timeout", "300",
                               "--", *WORKER, str(tmp_path / "ids"), "5", "--", "--strategy=multi_worker", *DIGITS,
                               f"--model_dir={model_dir}"], 330,
                     TFPAR_TEST_KILL_WORKER="0", TFPAR_TEST_ADD_HOST=f"{hosts}:host-c")
    assert code == 0, out[-4000:]
    assert "[launcher] worker-0 exited with 137; restarting all tasks (restart 1)\n" \
           f"[launcher] the hosts file {hosts} lists 3 worker(s): workers worker-0, worker-1 -> " \
           "worker-0, worker-1, worker-2\n" in out, out[-4000:]
    assert "resuming epoch 2 step 1 on 3 worker(s) (backup written by 2): global batch 48 kept as 16 per worker" in out
    summary = _summary(model_dir)
    assert summary["num_workers"] == 3 and summary["resumed_from"]["workers"] == 2, summary
    assert summary["resumed_from"]["step"] == 4 and summary["optimizer_updates"] == 12
    assert summary["examples_seen"] == 12 * 48 and summary["epochs_done"] == 4


@pytest.mark.parametrize("flags, hosts, message", [
    (["--hosts", "{f}", "--workers", "2"], "a\n", "--hosts sets the number of workers; drop --workers and --ps"),
    (["--workers", "2", "--max_workers", "3"], None, "--max_workers needs --hosts FILE (the workers a restart may add)"),
    (["--hosts", "{f}"], "# none yet\n\n", "The hosts file {f} lists no host; put one host per line."),
    (["--hosts", "{f}"], None, "The hosts file {f} cannot be read (No such file or directory)."),
])
def test_hosts_file_mistakes_are_one_sentence_and_exit_2(tmp_path, flags, hosts, message):
    path = tmp_path / "hosts"
    if hosts is not None:
        path.write_text(hosts)
    got, out = _run(LAUNCH + [f.format(f=path) for f in flags] + ["--", "true"], 60)
    assert got == 2 and f"tfpar-launch: error: {message.format(f=path)}" in out, out


def test_the_hosts_file_is_read_again_and_capped_at_max_workers(tmp_path):
    from tfpar.runtime import hostsfile

    path = tmp_path / "hosts"
    path.write_text("a\nb  # rack 2\n")
    assert hostsfile.read(str(path)) == ["a", "b"] and hostsfile.worker_count(str(path), 3) == 2
    path.write_text("a\nb\nc\nd\n")
    assert hostsfile.worker_count(str(path), 3) == 3 and hostsfile.worker_count(str(path)) == 4


@pytest.mark.slow
def test_allow_batch_change_resumes_a_backup_at_another_global_batch(tmp_path):
    """A backup written at global batch 48 (step 4: epoch 2, 1 step done) is refused at batch 24 in one sentence
    (exit 2, nothing trained), and with --allow_batch_change resumes at 24: the 48 examples of epoch 2 already
    trained count as 2 steps of 24, so 1 step of 24 is left."""
    model_dir = str(tmp_path / "run")
    flags = [*(f for f in DIGITS if not f.startswith(("--batch_size", "--epochs"))), "--epochs=2",
             "--strategy=one_device", f"--model_dir={model_dir}"]
    code, out = _run(WORKER + ["-", "5", "--", *flags, "--batch_size=48"], 240)  # dies in step 5: backup at 4
    assert code == -signal.SIGKILL, out[-3000:]
    backup_dir = os.path.join(model_dir, "backup")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out = _run(WORKER + ["-", "0", "--", *flags, "--batch_size=24"], 240)
    assert code == 2, out[-3000:]
    assert out.strip().splitlines()[-1].endswith(
        f"The backup in {backup_dir} trained with 48 examples per update but this run asks for 24; resume with the "
        "same --batch_size and --grad_accum_steps, or pass --allow_batch_change to continue with the new batch."), out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    code, out = _run(WORKER + ["-", "0", "--", *flags, "--batch_size=24", "--allow_batch_change=true"], 240)
    assert code == 0, out[-3000:]
    summary = _summary(model_dir)
    assert summary["resumed_from"] == {"epoch": 1, "batch": 1, "step": 4, "workers": 1,
                                       "path": os.path.join(backup_dir, "step-000000004")}, summary["resumed_from"]
    assert (summary["global_batch_size"], summary["examples_per_update"], summary["steps_done"]) == (24, 24, 1)
    assert summary["optimizer_updates"] == 5 and summary["examples_seen"] == 4 * 48 + 24
    assert summary["epochs_done"] == 2 and summary["learning_rate_peak"] == pytest.approx(2.0 * 24 / 256)


EDIT_HOSTS = """
import json, os, sys
config = json.loads(os.environ["TF_CONFIG"])
if len(config["cluster"]["worker"]) == 2 and config["task"]["index"] == 1:
    if sys.argv[2] == "gone":
        os.remove(sys.argv[1])
    else:
        open(sys.argv[1], "w").write(sys.argv[2])
    sys.exit(1)  # forces a restart, which reads the hosts file again
"""


@pytest.mark.parametrize("edit, code, line", [
    ("host-a\n", 0, "[launcher] the hosts file {f} lists 1 worker(s): workers worker-0, worker-1 -> worker-0\n"),
    ("gone", 69, "[launcher] The hosts file {f} cannot be read (No such file or directory). Stopping all tasks.\n"),
], ids=["a-host-taken-out", "file-gone"])
def test_a_restart_follows_the_hosts_file_as_it_is_then(tmp_path, edit, code, line):
    hosts = tmp_path / "hosts"
    hosts.write_text("host-a\nhost-b\n")
    got, out = _run(LAUNCH + ["--hosts", str(hosts), "--restarts", "1", "--timeout", "60", "--", sys.executable, "-c",
                              EDIT_HOSTS, str(hosts), edit], 90)
    assert got == code and line.format(f=hosts) in out, out
