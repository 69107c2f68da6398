"""Every input users get wrong: exit code 2, one sentence, no traceback, nothing overwritten.

Most cases run ``tfpar.cli.main`` in this process (an exception escaping it
would fail the test); the ones that need a fresh process (a strategy over
virtual CPUs) run the console script.
"""

import json
import os
import pickle

import numpy as np
import pytest

from helpers import quiet_env, run_reaped, tfpar_train_command

from tfpar.core import backup_store
from tfpar.runtime import backup
from tfpar.run import cli, driver as train

TINY = ["--model=resnet18", "--width_multiplier=0.125", "--image_size=16", "--epochs=2", "--batch_size=8",
        "--steps_per_epoch=3", "--validation_steps=1", "--verbose=0", "--notensorboard", "--nocheckpoint_best"]


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("tfpar-train: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----- data files -------------------------------------------------------------------------


def _cifar(root, data=None, labels=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 255, (4, 3072), dtype=np.uint8), b"labels": list(rng.randint(0, 10, 4))}
        if name == "data_batch_3":
            batch = {b"data": batch[b"data"] if data is None else data,
                     b"labels": batch[b"labels"] if labels is None else labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    return str(root)


def _png(size=8):
    import tensorflow as tf

    return tf.io.encode_png(np.full((size, size, 3), 128, np.uint8)).numpy()


def _tfrecord(root, label):
    import tensorflow as tf

    path = root / "train-00000-of-00001"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(16):
            feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png()])),
                       "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                           value=[label if i == 5 else i % 10]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(root / "train-*")


def _corrupt_image_folder(root):
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return str(root)


def _empty_folder(root):
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


# ----- model_dir states ---------------------------------------------------------------------


def _other_models_run(model_dir):
    model_dir.mkdir(parents=True)
    (model_dir / "summary.json").write_text(json.dumps({"config": {"model": "vgg11_bn", "width_multiplier": 0.125}}))


def _backup(model_dir, num_workers=1, **signature):
    """A well-formed backup on disk (its checkpoint bytes are never read: the metadata is refused first)."""

    def save(prefix):
        with open(prefix + ".index", "wb") as f:
            f.write(b"index")

    backup_store.write(str(model_dir / "backup"), save, step=4, epoch=1, num_workers=num_workers,
                       signature={"model": "resnet18", "num_classes": 10, "image_size": 16,
                                  "width_multiplier": 0.125, "optimizer": "sgd", **signature})


def _file_as_parent(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    return str(tmp_path / "a_file" / "run")


CASES = {
    "unknown strategy": (["--strategy=warp"], None, "Unknown strategy 'warp'; choose one of:"),
    "unknown model": (["--model=resnet7"], None, "Unknown model 'resnet7'; choose one of:"),
    "unknown precision": (["--precision=fp8"], None, "Unknown precision 'fp8'; choose one of:"),
    "malformed TF_CONFIG": ([], {"TF_CONFIG": '{"cluster": {"worker": ["h:1"]}, "task": '},
                            "TF_CONFIG is not valid JSON"),
    "TF_CONFIG task out of range": ([], {"TF_CONFIG": json.dumps({"cluster": {"worker": ["h:1"]},
                                                                  "task": {"type": "worker", "index": 3}})},
                                    "TF_CONFIG task index 3 is out of range"),
    "TPU not reachable": (["--strategy=tpu"], {"TPU_NAME": None, "TPU_ACCELERATOR_TYPE": None}, "No TPU found"),
    "labels outside [0, num_classes) in CIFAR": (["--data=cifar10:{cifar_bad_labels}"], None,
                                                 "has label 12, outside [0, 10)"),
    "labels outside [0, num_classes) in TFRecords": (["--data=tfrecord:{tfrecord_bad_label}"], None,
                                                     "is outside [0, 10); check the data or --num_classes"),
    "images of the wrong channels": (["--data=cifar10:{cifar_two_channels}"], None,
                                     "holds images of shape (4, 2048); expected rows of 3072 values"),
    "images of the wrong rank": (["--data=cifar10:{cifar_rank_3}"], None,
                                 "holds images of shape (4, 32, 96); expected rows of 3072 values"),
    "missing data path": (["--data=folder:{tmp}/nowhere"], None, "does not exist"),
    "empty data folder": (["--data=folder:{empty}"], None, "no class folders"),
    "corrupt image file": (["--data=folder:{corrupt}", "--num_classes=1"], None, "could not be decoded"),
    "corrupt CIFAR file": (["--data=cifar10:{cifar_garbage}"], None, "is not a valid python-pickle batch"),
    "model_dir of another model": (["--model_dir={other_model_dir}"], None,
                                   "holds a run of another model (model='vgg11_bn', this run has model='resnet18')"),
    "backup of another model": (["--model_dir={foreign_backup_dir}"], None,
                                "is of another model (width_multiplier=0.5, this run has width_multiplier=0.125)"),
    "cluster changed shape since the backup": (["--model_dir={two_worker_backup_dir}"], None,
                                               "was written by 2 worker(s) but this cluster has 1"),
    "non-writable model_dir": (["--model_dir={unwritable}"], None, "is not writable (Not a directory)"),
    "bad backup_freq": (["--backup_freq=sometimes"], None, "backup_freq must be 'epoch' or a positive number"),
    "NaN loss": (["--learning_rate=1e30", "--backup_freq=1", "--epochs=3"], None,
                 r"training stopped and "),
}


@pytest.fixture
def places(tmp_path):
    rng = np.random.RandomState(1)
    bad_labels = list(rng.randint(0, 10, 4))
    bad_labels[2] = 12
    p = {
        "tmp": str(tmp_path),
        "cifar_bad_labels": _cifar(tmp_path / "c1", labels=bad_labels),
        "cifar_two_channels": _cifar(tmp_path / "c2", data=np.zeros((4, 2048), np.uint8)),
        "cifar_rank_3": _cifar(tmp_path / "c3", data=np.zeros((4, 32, 96), np.uint8)),
        "empty": _empty_folder(tmp_path / "empty"),
        "corrupt": _corrupt_image_folder(tmp_path / "corrupt"),
        "unwritable": _file_as_parent(tmp_path),
        "other_model_dir": str(tmp_path / "other"),
        "foreign_backup_dir": str(tmp_path / "foreign"),
        "two_worker_backup_dir": str(tmp_path / "two"),
    }
    (tmp_path / "c4" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "c4" / "cifar-10-batches-py" / name).write_bytes(b"\x80\x04garbage")
    p["cifar_garbage"] = str(tmp_path / "c4")
    _other_models_run(tmp_path / "other")
    _backup(tmp_path / "foreign", width_multiplier=0.5)
    _backup(tmp_path / "two", num_workers=2)
    (tmp_path / "tfr").mkdir()
    p["tfrecord_bad_label"] = _tfrecord(tmp_path / "tfr", label=12)
    return p


def _snapshot(root):
    """Every file under ``root`` with its bytes: to prove nothing was overwritten."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[path] = f.read()
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_sentence(case, places, tmp_path, capsys, monkeypatch):
    args, env, message = CASES[case]
    for key, value in (env or {}).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    if not any(a.startswith("--model_dir") for a in args):
        args = args + [f"--model_dir={tmp_path / 'run'}"]
    before = _snapshot(str(tmp_path))
    if not any(a.startswith("--strategy=") for a in args):
        args = ["--strategy=one_device"] + args
    code = cli.main(["tfpar-train", *TINY] + [a.format(**places) for a in args])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert message in line, line
    assert line.endswith("."), line
    after = _snapshot(str(tmp_path))
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert not changed, changed  # nothing the user had was overwritten or deleted
    if case == "NaN loss":
        kept = backup.latest(str(tmp_path / "run" / "backup"))
        assert ("last good backup" in line) == (kept is not None)
        if kept is not None:  # the kept backup holds finite weights
            import tensorflow as tf

            reader = tf.train.load_checkpoint(kept.checkpoint_prefix)
            for name, _ in tf.train.list_variables(kept.checkpoint_prefix):
                if name.startswith("model/"):
                    assert np.all(np.isfinite(reader.get_tensor(name))), name


def test_virtual_cpus_after_devices_are_initialised(tmp_path, capsys):
    import tensorflow as tf

    have = len(tf.config.list_logical_devices("CPU"))  # initialises this process's devices
    code = cli.main(["tfpar-train", "--strategy=mirrored", f"--virtual_cpus={have + 1}", *TINY,
                     f"--model_dir={tmp_path}"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert f"virtual_cpus={have + 1} was asked after TensorFlow initialised its devices" in line


def _console(args, timeout=300):
    code, _, err = run_reaped(tfpar_train_command() + args, timeout, env=quiet_env())
    return code, err


FRESH_PROCESS_CASES = {
    "batch size that does not divide over replicas": (
        ["--strategy=mirrored", "--virtual_cpus=2", "--batch_size=15"], "does not divide evenly over 2 replicas"),
    "mesh shape not matching the devices": (
        ["--strategy=dtensor", "--virtual_cpus=4", "--mesh=batch=3,model=1", "--batch_size=12"],
        "Mesh batch=3,model=1 needs 3 CPU devices but this process has 4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FRESH_PROCESS_CASES))
def test_bad_input_in_a_fresh_process_exits_2(case, tmp_path):
    args, message = FRESH_PROCESS_CASES[case]
    if "--strategy=dtensor" in args and "dtensor" not in train.HOOKS:
        pytest.skip("this build has no dtensor training loop (tfpar.sharding)")
    tiny = [a for a in TINY if not a.startswith("--batch_size")]
    code, err = _console(args + tiny + [f"--model_dir={tmp_path}"])
    assert code == 2, err[-3000:]
    assert message in _error_line(err)
