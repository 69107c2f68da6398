"""tfpar.runtime.backup in one process: atomic layout, restore equals uninterrupted, damage, refusal, NaN."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfpar.runtime import backup

STEPS = 3  # steps per epoch


def _data():
    rng = np.random.RandomState(0)
    x = rng.rand(48, 6).astype("float32")
    y = (x.sum(axis=1) > 3).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48, seed=1).repeat().batch(8)
    return ds


def _model(lr=0.1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=2, decay_rate=0.5)
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _callback(backup_dir, save_freq="epoch", **kwargs):
    kwargs.setdefault("signature", {"model": "dense"})
    kwargs.setdefault("print_fn", None)
    kwargs.setdefault("preemption", False)
    return backup.BackupAndRestore(str(backup_dir), save_freq, **kwargs)


def _fit(model, cb, epochs, ds=None):
    ds = _data() if ds is None else ds
    return model.fit(cb.skip_completed(ds) if cb else ds, epochs=epochs, steps_per_epoch=STEPS,
                     callbacks=[cb] if cb else [], verbose=0)


def _weights(model):
    return [w.numpy() for w in model.weights] + [v.numpy() for v in model.optimizer.variables]


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    reference = _model()
    _fit(reference, None, epochs=3)

    first = _model()
    _fit(first, _callback(tmp_path, save_freq=2, keep=True), epochs=2)  # backups at steps 2, 4, 6
    assert sorted(os.listdir(tmp_path)) == ["step-000000004", "step-000000006"]  # max_to_keep=2
    # Drop the newest: the run resumes mid-epoch 2 (step 4 = epoch index 1, batch 1).
    shutil.rmtree(tmp_path / "step-000000006")

    resumed = _model()
    cb = _callback(tmp_path, save_freq=2)
    history = _fit(resumed, cb, epochs=3)
    assert cb.resumed == {"epoch": 1, "batch": 1, "step": 4, "path": str(tmp_path / "step-000000004"), "workers": 1}
    assert len(history.history["loss"]) == 2  # epochs 2 (its remaining 2 steps) and 3
    assert int(resumed.optimizer.iterations.numpy()) == 3 * STEPS
    # Same weights, slots, iterations (so the LR schedule position) as without the interruption.
    for a, b in zip(_weights(reference), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not os.path.exists(tmp_path)  # deleted after a successful finish


def test_a_step_backup_at_an_epoch_end_resumes_at_the_next_epoch(tmp_path):
    reference = _model()
    _fit(reference, None, epochs=3)
    _fit(_model(), _callback(tmp_path, save_freq=2, keep=True), epochs=2)  # step 6 = the last step of epoch 2
    meta = json.loads((tmp_path / "step-000000006" / backup.METADATA).read_text())
    assert (meta["epoch"], meta["batch"]) == (2, 0)  # not (1, 3): that resumed epoch would owe 0 steps
    resumed = _model()
    cb = _callback(tmp_path, save_freq=2)
    history = _fit(resumed, cb, epochs=3)
    assert cb.resumed["epoch"] == 2 and cb.resumed["batch"] == 0
    assert len(history.history["loss"]) == 1 and int(resumed.optimizer.iterations.numpy()) == 3 * STEPS
    for a, b in zip(_weights(reference), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_backup_layout_and_metadata(tmp_path):
    model = _model()
    _fit(model, _callback(tmp_path, keep=True, num_workers=1), epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["step-000000003", "step-000000006"]
    meta = json.loads((tmp_path / "step-000000006" / "backup.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch"], meta["num_workers"]) == (6, 2, 0, 1)
    assert meta["signature"] == {"model": "dense"}
    assert set(meta["files"]) == {"ckpt.index", "ckpt.data-00000-of-00001"}
    found = backup.latest(str(tmp_path))
    assert (found.step, found.epoch, found.batch) == (6, 2, 0)
    names = {n for n, _ in tf.train.list_variables(found.checkpoint_prefix)}
    assert any("optimizer" in n and "iteration" in n for n in names)


def test_truncated_backup_falls_back_to_the_previous_one(tmp_path, caplog):
    _fit(_model(), _callback(tmp_path, keep=True), epochs=2)
    data = tmp_path / "step-000000006" / "ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert backup.latest(str(tmp_path)).step == 3
    model = _model()
    cb = _callback(tmp_path)
    _fit(model, cb, epochs=2)
    assert cb.resumed["step"] == 3 and int(model.optimizer.iterations.numpy()) == 6
    assert "skipping damaged backup" in caplog.text


def test_all_backups_damaged_is_one_clear_error(tmp_path):
    _fit(_model(), _callback(tmp_path, keep=True), epochs=2)
    for step in ("step-000000003", "step-000000006"):
        (tmp_path / step / "ckpt.index").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"No intact backup in .*ckpt.index has 7 bytes.*delete"):
        _callback(tmp_path)


def test_crash_mid_save_leaves_the_previous_backup_loadable(tmp_path):
    _fit(_model(), _callback(tmp_path, keep=True), epochs=1)
    # A save killed half way: a .tmp- directory with a partial checkpoint and no metadata.
    partial = tmp_path / ".tmp-step-000000006-abc"
    partial.mkdir()
    (partial / "ckpt.index").write_bytes(b"\x00" * 10)
    assert backup.latest(str(tmp_path)).step == 3
    cb = _callback(tmp_path, keep=True)
    _fit(_model(), cb, epochs=2)
    assert cb.resumed["step"] == 3
    assert not partial.exists()  # the chief clears stale partial saves
    assert sorted(os.listdir(tmp_path)) == ["step-000000003", "step-000000006"]


def test_foreign_model_and_changed_cluster_are_refused(tmp_path):
    _fit(_model(), _callback(tmp_path, keep=True, num_workers=2), epochs=1)
    with pytest.raises(ValueError, match=r"of another model \(model='dense', this run has model='vgg11'\)"):
        _callback(tmp_path, signature={"model": "vgg11"}, num_workers=2)
    with pytest.raises(ValueError, match="written by 2 worker\\(s\\) but this cluster has 3"):
        _callback(tmp_path, num_workers=3)


def test_non_chief_writes_only_a_temporary_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    _fit(_model(), _callback(tmp_path / "backup", save_freq=1, is_chief=False, task_name="worker-1"), epochs=1)
    assert not (tmp_path / "backup").exists()
    assert os.listdir(tmp_path / "tmp") == []  # its private copies were removed


def test_nan_loss_stops_and_keeps_the_last_good_backup(tmp_path):
    x = np.random.RandomState(0).rand(32, 6).astype("float32")
    x[20] = np.nan  # batch 3 (step 3) carries a NaN
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(32, "int32"))).repeat().batch(8)
    cb = _callback(tmp_path, save_freq=1)
    with pytest.raises(ValueError, match=r"The loss became nan at step 3 \(epoch 1\); training stopped and "
                                         r"the last good backup \(.*step-000000002\) is kept"):
        _fit(_model(), cb, epochs=2, ds=ds)
    kept = backup.latest(str(tmp_path))
    assert kept.step == 2
    reader = tf.train.load_checkpoint(kept.checkpoint_prefix)
    for name, _ in tf.train.list_variables(kept.checkpoint_prefix):
        if name.startswith("model/"):
            assert np.all(np.isfinite(reader.get_tensor(name))), name


@pytest.mark.parametrize("value,expected", [("epoch", "epoch"), ("25", 25), (3, 3)])
def test_parse_freq(value, expected):
    assert backup.parse_freq(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "often", "", None])
def test_parse_freq_rejects(value):
    with pytest.raises(ValueError, match="backup_freq must be 'epoch' or a positive number of steps"):
        backup.parse_freq(value)
