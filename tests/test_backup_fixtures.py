"""Backups written by the code before issue 26 resume with today's code (tests/fixtures/backups/README.md)."""

import os
import shutil

import keras
import numpy as np
import pytest

from tfpar.kerasfix import compat
from tfpar.runtime import backup

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "backups")


def test_a_tfpar_format_1_mid_epoch_backup_resumes_at_its_step(tmp_path):
    from tfpar import train

    backup_dir = tmp_path / "run1" / "backup"
    shutil.copytree(os.path.join(FIXTURES, "tfpar_format1"), backup_dir)
    found = backup.latest(str(backup_dir))
    assert (found.epoch, found.batch, found.step) == (1, 1, 4)
    lines = []
    config = train.TrainConfig(model="resnet18", width_multiplier=0.0625, image_size=16, epochs=2, steps_per_epoch=3,
                               batch_size=16, validation_steps=1, backup_freq="4", keep_backups=True,
                               strategy="one_device", tensorboard=False, checkpoint_best=False, data="digits",
                               model_dir=str(tmp_path / "run1"))
    summary = train.run(config, print_fn=lines.append)
    assert summary["resumed_from"] == {"epoch": 1, "batch": 1, "step": 4, "path": str(backup_dir / "step-000000004"),
                                       "workers": 1}
    assert f"resumed from backup {backup_dir / 'step-000000004'}: epoch 2, step 4" in lines
    assert summary["optimizer_updates"] == 6  # the 2 steps epoch 2 still owed, not 3
    assert sorted(os.listdir(backup_dir)) == ["step-000000004"]  # no step 8 was reached; the old one is intact


def _keras_model():
    """The model of /tmp/fix/keep_mk.py, which wrote keras_backup_and_restore/ (see the README there)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _keras_data():
    x = np.random.RandomState(0).rand(24, 8).astype("float32")
    return x, (np.arange(24) % 3).astype("int32")


def test_a_keras_backup_with_tfpar_metadata_resumes_with_the_step_it_owed(tmp_path):
    compat.apply()
    backup_dir = tmp_path / "kb"
    shutil.copytree(os.path.join(FIXTURES, "keras_backup_and_restore"), backup_dir)
    model = _keras_model()
    steps = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))
    callback = keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=2, delete_checkpoint=False)
    x, y = _keras_data()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback, record], verbose=0, shuffle=False)
    assert steps == [0]  # 2 of the epoch's 3 steps were done before the backup
    assert int(model.optimizer.iterations.numpy()) == 3


def test_the_keras_fixture_is_refused_for_a_model_of_other_shapes(tmp_path):
    compat.apply()
    backup_dir = tmp_path / "kb"
    shutil.copytree(os.path.join(FIXTURES, "keras_backup_and_restore"), backup_dir)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _keras_data()
    with pytest.raises(ValueError, match=r"^The backup in .*kb is of another model \(weights='54faf213fcaf58f7', "
                                         r"this run has weights='[0-9a-f]{16}'\); use a new backup_dir or delete "
                                         r".*kb to start over\.$"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                  callbacks=[keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=2)])
    assert sorted(os.listdir(backup_dir)) == ["latest.weights.h5", "training_metadata.json"]  # kept
