"""Keras 3's own saving across workers (tfpar/kerasfix/saving.py, applied by tfpar.compat).

The slow tests run plain Keras ``fit`` with ``keras.callbacks.BackupAndRestore``,
``ModelCheckpoint`` and ``model.save`` as 2 worker processes through
tfpar-launch (tests/mw_keras_callbacks.py): only the chief writes, nothing is
left in the temporary directory, a rerun resumes, and a worker SIGKILLed
mid-epoch is restarted with the cluster and ends with the weights of an
uninterrupted run. With the fixes turned off, upstream still fails.
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_reaped

from tfpar.kerasfix import compat, saving

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras_backup_resume  # noqa: E402

BACKUP_FILES = ["latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
                "training_metadata.json.bkp"]


def launch(tmp_path, *args, out="out", restarts=0, disable=None, timeout=300):
    """2 workers of mw_keras_callbacks.py with their own TMPDIR; returns (exit code, output, out dir, tmp dir)."""
    temp = tmp_path / f"tmp-{out}"
    temp.mkdir(exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(temp))
    env.pop(compat.DISABLE_ENV, None)
    if disable:
        env[compat.DISABLE_ENV] = disable
    code, output, _ = run_reaped(
        [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--restarts", str(restarts),
         "--timeout", str(timeout - 20), "--", sys.executable, os.path.join(HERE, "mw_keras_callbacks.py"),
         str(tmp_path / out), *args], timeout, env=env, merge_output=True)
    return code, output, tmp_path / out, temp


def results(out):
    return [json.loads((out / f"result-worker-{i}.json").read_text()) for i in range(2)]


def writes(out, task):
    return (out / f"writes-{task}.log").read_text().split("\n")[:-1]


def weights_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# --- one process: resuming at the step, refusing a foreign backup -----------


def test_backup_resumes_mid_epoch_at_the_saved_step(tmp_path):
    compat.apply()
    found = keras_backup_resume.run(str(tmp_path))
    assert found["saved"]["epoch"] == 1 and found["saved"]["tfpar"]["steps_done"] == 1  # step 6 = epoch 2, 1 step in
    assert found["reference_steps"] == found["resumed_steps"] == 15
    assert found["resumed_epochs"] == 2  # the rest of epoch 2, then epoch 3
    assert found["same_weights"]


@pytest.mark.slow
def test_upstream_backup_redoes_the_steps_of_the_resumed_epoch(tmp_path):
    code, out, _ = run_reaped([sys.executable, os.path.join(HERE, "keras_backup_resume.py"), str(tmp_path)], 240,
                              env=dict(os.environ, **{compat.DISABLE_ENV: "backup_resume_step"}))
    assert code == 0, out[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert found["saved"] == {"epoch": 1, "batch": 0}  # Keras's own record: "batch" 0 also means one step in
    assert found["resumed_steps"] == 16 and not found["same_weights"]  # epoch 2 started over


def _tiny(width):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    return model


def _fit_with_backup(model, backup_dir):
    import keras

    x = np.zeros((8, 4), "float32")
    model.fit(x, np.zeros((8, 2), "float32"), epochs=1, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False)])


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_backup_of_another_model_is_refused_in_one_sentence_and_kept(tmp_path):
    compat.apply()
    _fit_with_backup(_tiny(3), tmp_path / "backup")
    before = _snapshot(tmp_path / "backup")
    with pytest.raises(ValueError) as err:
        _fit_with_backup(_tiny(5), tmp_path / "backup")
    theirs, ours = saving.weights_signature(_tiny(3)), saving.weights_signature(_tiny(5))  # optimizer, shapes
    assert theirs != ours
    assert str(err.value) == (f"The backup in {tmp_path / 'backup'} is of another model (weights={theirs!r}, this "
                              f"run has weights={ours!r}); use a new backup_dir or delete {tmp_path / 'backup'} "
                              f"to start over.")
    assert _snapshot(tmp_path / "backup") == before


def test_a_backup_of_another_keras_major_version_is_refused_in_one_sentence(tmp_path):
    import keras

    compat.apply()
    _fit_with_backup(_tiny(3), tmp_path / "backup")
    meta_path = tmp_path / "backup" / "training_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["tfpar"]["keras_version"] = "9.0.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as err:
        _fit_with_backup(_tiny(3), tmp_path / "backup")
    major = keras.__version__.split(".")[0]
    assert str(err.value) == (f"The backup in {tmp_path / 'backup'} is of another model (keras='9', this run has "
                              f"keras={major!r}); use a new backup_dir or delete {tmp_path / 'backup'} to start over.")


def test_a_backup_dir_of_tf_keras_or_another_tool_is_refused_and_kept(tmp_path):
    compat.apply()
    backup = tmp_path / "backup" / "chief"  # tf_keras's BackupAndRestore layout: a TF checkpoint
    backup.mkdir(parents=True)
    (backup / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (backup / "ckpt-1.index").write_bytes(b"\x00index")
    before = _snapshot(tmp_path / "backup")
    with pytest.raises(ValueError, match=r"^backup_dir .*backup holds no Keras 3 BackupAndRestore backup \(chief\): "
                                         r"another tool's or Keras 2's files, which Keras would delete at the end; "
                                         r"use an empty or new backup_dir\.$"):
        _fit_with_backup(_tiny(3), tmp_path / "backup")
    assert _snapshot(tmp_path / "backup") == before


def test_a_keras_3_backup_without_tfpar_metadata_that_does_not_fit_is_one_sentence(tmp_path):
    compat.apply()
    _fit_with_backup(_tiny(3), tmp_path / "backup")
    meta = tmp_path / "backup" / "training_metadata.json"
    meta.write_text(json.dumps({"epoch": 1, "batch": 0}))  # as plain Keras writes it
    before = _snapshot(tmp_path / "backup")
    with pytest.raises(ValueError, match=r"^The backup in .*backup does not fit this model \(.+\); use a new "
                                         r"backup_dir or delete .*backup to start over\.$"):
        _fit_with_backup(_tiny(5), tmp_path / "backup")
    assert _snapshot(tmp_path / "backup") == before


# --- two workers through tfpar-launch (slow) --------------------------------


@pytest.mark.slow
def test_only_the_chief_writes_and_a_rerun_resumes_from_its_backup(tmp_path):
    import keras

    code, output, out, temp = launch(tmp_path, "--keep", "--epochs=3")
    assert code == 0, output[-4000:]
    first = results(out)
    assert first[0]["iterations"] == first[1]["iterations"] == 15
    assert weights_equal(first[0]["weights"], first[1]["weights"])
    assert writes(out, "worker-1") == []  # the other worker wrote nothing under OUT_DIR
    chief_wrote = writes(out, "worker-0")
    assert any("/backup/training_metadata.json" in w for w in chief_wrote)
    assert any(w.endswith("/ckpt/best.keras") for w in chief_wrote) and chief_wrote[-1].endswith("/model.keras")
    assert os.listdir(temp) == []  # the other worker's temporary directories were removed
    assert sorted(os.listdir(out / "backup")) == BACKUP_FILES  # double_checkpoint, delete_checkpoint=False
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 3
    assert sorted(os.listdir(out / "ckpt")) == ["best.keras", "weights-01.weights.h5", "weights-02.weights.h5",
                                               "weights-03.weights.h5"]
    saved = keras.models.load_model(out / "model.keras")
    assert weights_equal(saved.get_weights(), first[0]["weights"])
    saved.load_weights(out / "ckpt" / "weights-03.weights.h5")
    assert weights_equal(saved.get_weights(), first[0]["weights"])

    # The same command for 5 epochs: both workers restore the chief's backup and run epochs 4-5 only.
    (out / "writes-worker-1.log").unlink()
    code, output, out, temp = launch(tmp_path, "--keep", "--epochs=5")
    assert code == 0, output[-4000:]
    second = results(out)
    assert [r["epochs_run"] for r in second] == [2, 2] and [r["iterations"] for r in second] == [25, 25]
    assert weights_equal(second[0]["weights"], second[1]["weights"])
    assert writes(out, "worker-1") == [] and os.listdir(temp) == []


@pytest.mark.slow
def test_sigkill_one_worker_mid_epoch_the_restarted_cluster_ends_as_an_uninterrupted_run(tmp_path):
    code, output, reference, _ = launch(tmp_path, "--backup_freq=2", out="reference")
    assert code == 0, output[-4000:]
    # Backups every 2 steps, 5 steps an epoch: worker 1 dies before step 8, the last backup is step 6 (epoch 2).
    code, output, out, temp = launch(tmp_path, "--backup_freq=2", "--kill_worker_1_before_step=8", restarts=1,
                                     timeout=400)
    assert code == 0, output[-4000:]
    assert "worker-1 exited with 137; restarting all tasks (restart 1)" in output
    resumed, uninterrupted = results(out), results(reference)
    assert [r["epochs_run"] for r in resumed] == [2, 2]  # the rest of epoch 2, then epoch 3
    assert [r["iterations"] for r in resumed] == [15, 15]  # not one step redone or skipped
    for r in resumed:
        assert weights_equal(r["weights"], uninterrupted[0]["weights"])
    assert not (out / "backup").exists()  # delete_checkpoint: the chief removed it after the finish
    assert writes(out, "worker-1") == [] and os.listdir(temp) == []


@pytest.mark.slow
@pytest.mark.parametrize("disable,real_paths", [
    ("backup_chief_only", ["/backup/"]),
    ("model_checkpoint_chief_only,model_save_chief_only", ["/ckpt/", "/model.keras"]),
])
def test_without_the_chief_only_fixes_every_worker_writes_the_chiefs_files(tmp_path, disable, real_paths):
    code, output, out, _ = launch(tmp_path, "--keep", "--epochs=2", disable=disable)
    collided = ("FileExistsError" in output or "unable to lock file" in output
                or "Unable to synchronously create file" in output)
    other = writes(out, "worker-1")
    # Upstream: worker 1 writes the chief's paths, and when the two collide the run fails.
    assert collided or any(p in w for w in other for p in real_paths), output[-3000:]
