"""Keras 3's own saving under ``MultiWorkerMirroredStrategy``: only the chief writes (DESIGN.md item 16).

Keras 3 has no notion of a chief: ``model.save``, ``model.save_weights``,
``keras.callbacks.ModelCheckpoint`` and ``keras.callbacks.BackupAndRestore``
make every worker write the same files (h5py: "unable to lock file"), and
every worker deletes the backup at the end. tf_keras let only the chief write
the real path and gave the other workers a temporary directory. Saving must
still run on every worker (all of them must take part when a variable read is
a collective), so here the other workers save into a private temporary
directory that is removed at once: the rule of ``tfpar.core.backup_store``,
which tfpar's own backups follow too.

``BackupAndRestore`` also drops half of what it records: its metadata has the
batch, but a restart resumes at the start of the epoch and redoes those
steps, and its next mid-epoch backup records epoch 0. ``install_backup_resume``
makes a restart continue at the saved epoch and step (ending the resumed epoch
after the steps it still owed: ``tfpar.core.epoch_resume``, as tfpar's own
callback does), and refuses, in one sentence and before anything is written, a
backup directory that holds another model's backup
(``backup_store.refuse_foreign``) or something that is not a Keras 3 backup.
Each ``BackupAndRestore`` keeps this state in one attribute,
``_tfpar_backup`` (a ``KerasBackupState``).

The install functions are called by ``tfpar.compat.apply()``. Each wraps the
few Keras methods involved; the chief-only ones delegate to Keras unchanged
outside multi-worker runs, the resume one applies under any strategy.
"""

import contextlib
import dataclasses
import json
import os
import shutil

from tfpar.core import backup_store
from tfpar.core.backup_store import weights_signature
from tfpar.core.devices import barrier, is_multi_worker
from tfpar.core.epoch_resume import EpochResume, normalized
from tfpar.core.summary import write_json_atomic

METADATA_KEY = "tfpar"  # our entry in BackupAndRestore's training_metadata.json
# BackupAndRestore's attributes naming the files it writes (Keras 3.x).
BACKUP_PATHS = ("_weights_path", "_training_metadata_path", "_prev_weights_path", "_prev_training_metadata_path")


# ------------------------------------------------------------------ who writes


def _is_other_worker(strategy):
    """True on a multi-worker task that is not the chief: it must not write the real path."""
    return is_multi_worker(strategy) and not strategy.extended.should_checkpoint


def _task_name(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return f"{getattr(resolver, 'task_type', 'worker')}-{getattr(resolver, 'task_id', 0)}"


def worker_temp_dir(strategy, what):
    """A private temporary directory for a non-chief worker's copy; removed on exit."""
    return backup_store.worker_temp_dir(_task_name(strategy), what)


# ------------------------------------------------------------------ model.save / save_weights


def _strategy_of(model):
    import tensorflow as tf

    return getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()


def install_model_save():
    """``Model.save``/``save_weights``: a non-chief worker writes into a temporary directory."""
    import keras

    cls = keras.Model
    for name in ("save", "save_weights"):
        original = getattr(cls, name)

        def method(self, filepath, *args, __original=original, **kwargs):
            strategy = _strategy_of(self)
            if not _is_other_worker(strategy):
                return __original(self, filepath, *args, **kwargs)
            with worker_temp_dir(strategy, "save") as tmp:
                return __original(self, os.path.join(tmp, os.path.basename(os.fspath(filepath))), *args, **kwargs)

        method.__name__ = name
        method.__doc__ = original.__doc__
        method.__tfpar_original__ = original
        setattr(cls, name, method)


# ------------------------------------------------------------------ ModelCheckpoint


def install_model_checkpoint():
    """``ModelCheckpoint._save_model``: a non-chief worker saves into a temporary directory."""
    import keras

    cls = keras.callbacks.ModelCheckpoint
    original = cls._save_model

    def _save_model(self, epoch, batch, logs):
        strategy = _strategy_of(self.model)
        if not _is_other_worker(strategy):
            return original(self, epoch, batch, logs)
        real = self.filepath
        with worker_temp_dir(strategy, "checkpoint") as tmp:
            self.filepath = os.path.join(tmp, os.path.basename(real))
            try:
                return original(self, epoch, batch, logs)
            finally:
                self.filepath = real

    _save_model.__tfpar_original__ = original
    cls._save_model = _save_model


# ------------------------------------------------------------------ BackupAndRestore: who writes


@contextlib.contextmanager
def _backup_paths_in(callback, directory):
    """Point ``callback``'s files into ``directory`` for the duration."""
    saved = {name: getattr(callback, name) for name in ("backup_dir", *BACKUP_PATHS)}
    callback.backup_dir = directory
    for name in BACKUP_PATHS:
        setattr(callback, name, os.path.join(directory, os.path.basename(saved[name])))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(callback, name, value)


def install_backup_chief_only():
    """``BackupAndRestore``: only the chief writes and deletes; every worker restores the chief's files.

    A non-chief worker saves (weights and metadata, and the ``.bkp`` copies of
    ``double_checkpoint``) into a temporary directory, and restores from a
    private copy of the chief's files, so Keras's repair of a damaged backup
    (copying ``.bkp`` over it) happens on the chief alone. At the end all
    workers meet before the chief deletes the backup (none is still reading
    it) and after (none starts another fit that would find it).
    """
    import keras

    cls = keras.callbacks.BackupAndRestore
    originals = {name: getattr(cls, name) for name in ("on_train_begin", "_save_model", "on_train_end")}

    def on_train_begin(self, logs=None):
        strategy = _strategy_of(self.model)
        if not _is_other_worker(strategy):
            return originals["on_train_begin"](self, logs)
        real = {name: getattr(self, name) for name in BACKUP_PATHS}
        state = _state(self)
        state.chief_dir = self.backup_dir
        try:
            with worker_temp_dir(strategy, "restore") as tmp, _backup_paths_in(self, tmp):
                for name, path in real.items():
                    if os.path.exists(path):
                        shutil.copy(path, getattr(self, name))
                return originals["on_train_begin"](self, logs)
        finally:
            state.chief_dir = None

    def _save_model(self):
        strategy = _strategy_of(self.model)
        if not _is_other_worker(strategy):
            return originals["_save_model"](self)
        with worker_temp_dir(strategy, "backup") as tmp, _backup_paths_in(self, tmp):
            return originals["_save_model"](self)

    def on_train_end(self, logs=None):
        strategy = _strategy_of(self.model)
        if not is_multi_worker(strategy):
            return originals["on_train_end"](self, logs)
        barrier(strategy)  # no worker is still restoring from the backup
        try:
            if strategy.extended.should_checkpoint:
                originals["on_train_end"](self, logs)
        finally:
            barrier(strategy)  # and none starts a new fit before it is deleted

    for name, fn in (("on_train_begin", on_train_begin), ("_save_model", _save_model),
                     ("on_train_end", on_train_end)):
        fn.__tfpar_original__ = originals[name]
        setattr(cls, name, fn)


# ------------------------------------------------------------------ BackupAndRestore: where to resume


@dataclasses.dataclass
class KerasBackupState:
    """What tfpar keeps on one ``keras.callbacks.BackupAndRestore`` (as ``_tfpar_backup``)."""

    position: EpochResume = dataclasses.field(default_factory=EpochResume)
    chief_dir: object = None  # the chief's backup_dir while a non-chief worker restores from a private copy


def _state(callback):
    state = getattr(callback, "_tfpar_backup", None)
    if state is None:
        state = callback._tfpar_backup = KerasBackupState()
    return state


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remedy(directory):
    return f"use a new backup_dir or delete {directory} to start over"


def _check_backup_dir(callback):
    """Raise ``ValueError`` (one sentence) for a backup_dir Keras would misread or later delete."""
    import keras

    directory = _state(callback).chief_dir or callback.backup_dir  # the chief's
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    ours = {os.path.basename(getattr(callback, name)) for name in BACKUP_PATHS}
    present = sorted(os.listdir(directory))
    if not ours & set(present):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ValueError(
            f"backup_dir {directory} holds no Keras 3 BackupAndRestore backup ({shown}): another tool's or "
            f"Keras 2's files, which Keras would delete at the end; use an empty or new backup_dir.")
    mine = (_read_json(callback._training_metadata_path) or {}).get(METADATA_KEY) or {}
    recorded = {}
    if mine.get("keras_version"):
        recorded["keras"] = mine["keras_version"].split(".")[0]  # the weights file format follows the major
    if mine.get("signature"):
        recorded["weights"] = mine["signature"]
    current = {"keras": keras.__version__.split(".")[0], "weights": weights_signature(callback.model)}
    backup_store.refuse_foreign(directory, recorded, current, _remedy(directory))


def resumed_steps(callbacks, epoch):
    """Steps of ``epoch`` a restored mid-epoch backup already did (0 if none): a loop that
    counts steps itself (``tfpar.kerasfix.ps_fit``) runs only the rest, as Keras ``fit`` does with this fix."""
    for callback in callbacks:
        state = getattr(callback, "_tfpar_backup", None)
        if state is not None and state.position.steps_before(epoch):
            return state.position.steps_before(epoch)
    return 0


def install_backup_resume():
    """``BackupAndRestore``: resume at the saved epoch *and step*; refuse a foreign backup in one sentence."""
    import keras

    cls = keras.callbacks.BackupAndRestore
    names = ("_load_model", "_save_model", "on_epoch_begin", "on_train_batch_end", "on_epoch_end")
    originals = {name: getattr(cls, name) for name in names}

    def _load_model(self):
        if self.model.built and self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # as Keras does, for the signature
        _check_backup_dir(self)
        state = _state(self)
        state.position = EpochResume()
        try:
            result = originals["_load_model"](self)
        except ValueError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            directory = state.chief_dir or self.backup_dir
            raise ValueError(f"The backup in {directory} does not fit this model ({first}); "
                             f"{_remedy(directory)}.") from None
        meta = _read_json(self._training_metadata_path)
        if meta and os.path.exists(self._weights_path):
            mine = meta.get(METADATA_KEY) or {}
            if "steps_done" in mine:
                done = int(mine["steps_done"])
            else:  # a plain Keras backup: "batch" is the last step's index, 0 also at an epoch's end
                done = int(meta.get("batch", 0)) + 1 if int(meta.get("batch", 0)) else 0
            steps = (self.params or {}).get("steps")
            epoch, done = normalized(int(meta.get("epoch", 0)), done, steps)
            self.model._initial_epoch = epoch
            self._current_epoch = epoch  # Keras leaves it at 0, and the next mid-epoch backup would say epoch 0
            if done and steps:
                state.position = EpochResume(resumed_epoch=epoch, done_before=done)
        return result

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        _state(self).position.epoch_begin(epoch)
        return originals["on_epoch_begin"](self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        _state(self).position.batch_end(batch, self.model, (self.params or {}).get("steps"))  # before a save reads it
        return originals["on_train_batch_end"](self, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        _state(self).position.epoch_end(self.model)
        return originals["on_epoch_end"](self, epoch, logs)

    def _save_model(self):
        result = originals["_save_model"](self)
        meta = _read_json(self._training_metadata_path)
        if meta is not None:
            meta[METADATA_KEY] = {"steps_done": _state(self).position.done,
                                  "signature": weights_signature(self.model), "keras_version": keras.__version__}
            write_json_atomic(self._training_metadata_path, meta)
        return result

    for name, fn in (("_load_model", _load_model), ("on_epoch_begin", on_epoch_begin),
                     ("on_train_batch_end", on_train_batch_end), ("on_epoch_end", on_epoch_end),
                     ("_save_model", _save_model)):
        fn.__tfpar_original__ = originals[name]
        setattr(cls, name, fn)
