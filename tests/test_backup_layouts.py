"""Parameter-server, sharded and Ray checkpoints are backups of tfpar.core.backup_store (step-N/: ckpt.*, backup.json)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfpar.core import backup_store
from tfpar.parallel import parameter_server

STEPS = 3


def _model(width=8):
    keras.utils.set_random_seed(0)
    # Fixed names: checkpoints key the variables by path, as every restarted process builds them.
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(width, activation="relu", name="hidden"),
                              keras.layers.Dense(2, name="out")], name="net")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, name="sgd"),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data():
    x = np.random.RandomState(0).rand(8 * STEPS, 6).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, (x.sum(axis=1) > 3).astype("int32"))).batch(8).repeat()


def _fit(model, epochs, *callbacks):
    return model.fit(_data(), epochs=epochs, steps_per_epoch=STEPS, callbacks=list(callbacks), verbose=0)


def _state(model):
    return [np.asarray(w) for w in model.weights] + [np.asarray(v) for v in model.optimizer.variables]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_parameter_server_checkpoints_are_backups_and_resume_at_the_next_epoch(tmp_path):
    reference = _model()
    _fit(reference, 3)
    _fit(_model(), 2, parameter_server.checkpoints(str(tmp_path), keep=3))
    assert sorted(os.listdir(tmp_path)) == ["step-000000003", "step-000000006"]
    meta = json.loads((tmp_path / "step-000000006" / backup_store.METADATA).read_text())
    assert (meta["step"], meta["epoch"], meta["batch"], meta["num_workers"]) == (6, 2, 0, None)
    assert {"ckpt.index", "ckpt.data-00000-of-00001"} <= set(meta["files"])

    resumed, saver = _model(), parameter_server.checkpoints(str(tmp_path), keep=2)
    history = _fit(resumed, 3, saver)
    assert saver.initial_epoch == 2 and len(history.history["loss"]) == 1
    assert "latest checkpoint in" in saver.resume_hint() and "(epoch 3)" in saver.resume_hint()
    _assert_same(_state(reference), _state(resumed))  # weights, slots and iterations as without the stop
    assert sorted(os.listdir(tmp_path)) == ["step-000000006", "step-000000009"]  # keep=2


def test_a_parameter_server_checkpoint_written_before_issue_26_still_resumes(tmp_path):
    reference = _model()
    _fit(reference, 3)
    old = _model()
    _fit(old, 2)
    # The writer before issue 26: a CheckpointManager of the TF variables and an int64 "epoch" variable.
    legacy = tf.train.Checkpoint(variables=parameter_server._checkpoint_variables(old),
                                 epoch=tf.Variable(2, dtype=tf.int64, trainable=False, name="epoch"))
    tf.train.CheckpointManager(legacy, str(tmp_path), max_to_keep=3).save(checkpoint_number=2)

    resumed, saver = _model(), parameter_server.checkpoints(str(tmp_path))
    history = _fit(resumed, 3, saver)
    assert saver.initial_epoch == 2 and len(history.history["loss"]) == 1
    _assert_same(_state(reference), _state(resumed))
    assert backup_store.latest(str(tmp_path)).step == 9  # and from now on in the backup layout


def test_a_parameter_server_checkpoint_that_names_other_variables_is_not_silently_skipped(tmp_path):
    _fit(_model(), 1, parameter_server.checkpoints(str(tmp_path)))
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    other.compile(keras.optimizers.SGD(0.1, momentum=0.9, name="sgd"), "mse")
    with pytest.raises(ValueError, match=r"^The backup .*step-000000003 could not be restored \(Found 8 Python "
                                         r"objects that were not bound to checkpointed values.*; delete .* to train"):
        _fit(other, 1, parameter_server.checkpoints(str(tmp_path)))


def test_a_parameter_server_checkpoint_of_another_model_is_refused(tmp_path):
    _fit(_model(), 1, parameter_server.checkpoints(str(tmp_path)))
    with pytest.raises(ValueError, match=r"^The backup in .* is of another model \(weights='[0-9a-f]{16}', this run "
                                         r"has weights='[0-9a-f]{16}'\); use a new model_dir or backup_dir"):
        _fit(_model(width=5), 1, parameter_server.checkpoints(str(tmp_path)))


def test_sharded_trainer_saves_a_backup_and_restores_it_and_the_old_layout(tmp_path):
    from tfpar import sharding

    dmesh = sharding.mesh("batch=1")
    build = lambda: keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),  # noqa: E731
                                      keras.layers.Dense(2)])
    make = lambda: sharding.ShardedTrainer(build, dmesh, None,  # noqa: E731
                                           optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.9))
    x = np.random.RandomState(0).rand(8, 6).astype("float32")
    y = (x.sum(axis=1) > 3).astype("int32")
    trainer = make()
    for _ in range(2):
        trainer.train_on_batch(x, y)
    assert trainer.save(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    saved = trainer.get_weights()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-000000002"]
    assert backup_store.latest(str(tmp_path / "ckpt")).step == 2
    trainer.train_on_batch(x, y)
    trainer.save(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-000000003"]  # keep=1: the newest replaces the older
    fresh = make().restore(str(tmp_path / "ckpt" / "step-000000003"))
    _assert_same(fresh.get_weights(), trainer.get_weights())

    # The layout before issue 26: directory/ckpt.* written by tf.train.Checkpoint.write.
    tf.train.Checkpoint(model=fresh.model, optimizer=fresh.optimizer).write(str(tmp_path / "old" / "ckpt"))
    older = make()
    older.set_weights(saved)
    assert not all(np.array_equal(a, b) for a, b in zip(older.get_weights(), fresh.get_weights()))
    older.restore(str(tmp_path / "old"))
    _assert_same(older.get_weights(), fresh.get_weights())
    with pytest.raises(ValueError, match="No sharded checkpoint in"):
        make().restore(str(tmp_path / "nothing"))


class _RayCheckpoint:
    """What restore_ray_checkpoint uses of a ``ray.train.Checkpoint``."""

    def __init__(self, path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(self.path)


def _touch_checkpoint(prefix):
    with open(prefix + ".index", "wb") as f:
        f.write(b"index")


def test_a_ray_checkpoint_is_copied_into_the_backup_dir_once(tmp_path):
    from tfpar.run import ray as tfpar_ray

    made = backup_store.write(str(tmp_path / "ray"), _touch_checkpoint, step=12, epoch=2, num_workers=2)
    backup_dir = tmp_path / "backup"
    assert tfpar_ray.restore_ray_checkpoint(_RayCheckpoint(made.path), str(backup_dir)) == str(
        backup_dir / "step-000000012")
    found = backup_store.latest(str(backup_dir))
    assert (found.step, found.epoch, found.num_workers) == (12, 2, 2)
    assert sorted(os.listdir(backup_dir)) == ["step-000000012"]  # no temporary copy left
    # A backup as new is already there (another worker's copy won): it is used as it is.
    assert tfpar_ray.restore_ray_checkpoint(_RayCheckpoint(made.path), str(backup_dir)) == found.path
    assert tfpar_ray.restore_ray_checkpoint(None, str(backup_dir)) is None
    with pytest.raises(ValueError, match=r"is not a tfpar backup \(unreadable metadata"):
        tfpar_ray.restore_ray_checkpoint(_RayCheckpoint(str(tmp_path)), str(backup_dir))


def test_staged_keeps_the_first_copy_when_not_replacing(tmp_path):
    final = str(tmp_path / "step-000000001")
    for content in (b"first", b"second"):
        with backup_store.staged(final, replace=False) as work:
            (tmp_path / work / "f").write_bytes(content)
    assert (tmp_path / "step-000000001" / "f").read_bytes() == b"first"
    with backup_store.staged(final) as work:
        (tmp_path / work / "f").write_bytes(b"third")
    assert (tmp_path / "step-000000001" / "f").read_bytes() == b"third"
    assert sorted(os.listdir(tmp_path)) == ["step-000000001"]
