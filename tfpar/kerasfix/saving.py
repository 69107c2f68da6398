"""Keras 3's own saving under ``MultiWorkerMirroredStrategy``: only the chief writes (DESIGN.md item 16).

Keras 3 has no notion of a chief: ``model.save``, ``model.save_weights``,
``keras.callbacks.ModelCheckpoint`` and ``keras.callbacks.BackupAndRestore``
make every worker write the same files (h5py: "unable to lock file"), and
every worker deletes the backup at the end. tf_keras let only the chief write
the real path and gave the other workers a temporary directory. Saving must
still run on every worker (all of them must take part when a variable read is
a collective), so here the other workers save into a private temporary
directory (``worker_temp_dir``) that is removed at once, as ``tfpar.backup``
does for its own backups.

``BackupAndRestore`` also drops half of what it records: its metadata has the
batch, but a restart resumes at the start of the epoch and redoes those
steps, and its next mid-epoch backup records epoch 0. ``resume_*`` below make
a restart continue at the saved epoch and step (ending the resumed epoch
after the steps it still owed, as ``tfpar.backup`` does), and refuse, in one
sentence and before anything is written, a backup directory that holds
another model's backup or something that is not a Keras 3 backup.

The install functions are called by ``tfpar.compat.apply()``. Each wraps the
few Keras methods involved; the chief-only ones delegate to Keras unchanged
outside multi-worker runs, the resume one applies under any strategy.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from tfpar.core.devices import barrier, is_multi_worker

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


@contextlib.contextmanager
def worker_temp_dir(strategy, what):
    """A private temporary directory for a non-chief worker's copy; removed on exit."""
    path = tempfile.mkdtemp(prefix=f"tfpar-{what}-{_task_name(strategy)}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
        self._tfpar_real_backup_dir = self.backup_dir
        try:
            with worker_temp_dir(strategy, "restore") as tmp, _backup_paths_in(self, tmp):
                for name, path in real.items():
                    if os.path.exists(path):
                        shutil.copy(path, getattr(self, name))
                return originals["on_train_begin"](self, logs)
        finally:
            del self._tfpar_real_backup_dir

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


def weights_signature(model):
    """What a weights file must match to load into ``model``: optimizer class, shapes and dtypes in order."""
    shapes = [[list(v.shape), str(v.dtype)] for v in model.weights]
    text = json.dumps([type(model.optimizer).__name__, shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_backup_dir(callback):
    """Raise ``ValueError`` (one sentence) for a backup_dir Keras would misread or later delete."""
    import keras

    directory = getattr(callback, "_tfpar_real_backup_dir", None) or callback.backup_dir  # the chief's
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    ours = {os.path.basename(getattr(callback, name)) for name in BACKUP_PATHS}
    present = sorted(os.listdir(directory))
    if not ours & set(present):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ValueError(
            f"backup_dir {directory} holds no Keras 3 BackupAndRestore backup ({shown}): another tool's or "
            f"Keras 2's files, which Keras would delete at the end; use an empty or new backup_dir.")
    meta = _read_json(callback._training_metadata_path) or {}
    mine = meta.get(METADATA_KEY) or {}
    version = mine.get("keras_version")
    if version and version.split(".")[0] != keras.__version__.split(".")[0]:
        raise ValueError(
            f"The backup in {directory} was written by Keras {version} and this is Keras {keras.__version__}; "
            f"use a new backup_dir or delete {directory} to start over.")
    if mine.get("signature") and mine["signature"] != weights_signature(callback.model):
        raise ValueError(
            f"The backup in {directory} was written by another model (other optimizer or weight shapes); "
            f"use a new backup_dir or delete {directory} to start over.")


def resumed_steps(callbacks, epoch):
    """Steps of ``epoch`` a restored mid-epoch backup already did (0 if none): a loop that
    counts steps itself (``tfpar.ps_fit``) runs only the rest, as Keras ``fit`` does with this fix."""
    for callback in callbacks:
        resume = getattr(callback, "_tfpar_resume", None)
        if resume and resume["epoch"] == epoch:
            return resume["done"]
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
        self._tfpar_resume = None
        try:
            result = originals["_load_model"](self)
        except ValueError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            directory = getattr(self, "_tfpar_real_backup_dir", None) or self.backup_dir
            raise ValueError(
                f"The backup in {directory} does not fit this model ({first}); "
                f"use a new backup_dir or delete {directory} to start over.") from None
        meta = _read_json(self._training_metadata_path)
        if meta and os.path.exists(self._weights_path):
            epoch = int(meta.get("epoch", 0))
            mine = meta.get(METADATA_KEY) or {}
            if "steps_done" in mine:
                done = int(mine["steps_done"])
            else:  # a plain Keras backup: "batch" is the last step's index, 0 also at an epoch's end
                done = int(meta.get("batch", 0)) + 1 if int(meta.get("batch", 0)) else 0
            steps = (self.params or {}).get("steps")
            if done and steps and done >= steps:
                epoch, done = epoch + 1, 0  # the backup was the epoch's last step
            self.model._initial_epoch = epoch
            self._current_epoch = epoch  # Keras leaves it at 0, and the next mid-epoch backup would say epoch 0
            if done and steps:
                self._tfpar_resume = {"epoch": epoch, "done": done}
        return result

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        self._tfpar_steps_done = 0
        resume = getattr(self, "_tfpar_resume", None)
        self._tfpar_offset = resume["done"] if resume and epoch == resume["epoch"] else 0
        self._tfpar_cut = False
        return originals["on_epoch_begin"](self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        offset = getattr(self, "_tfpar_offset", 0)
        self._tfpar_steps_done = offset + batch + 1
        result = originals["on_train_batch_end"](self, batch, logs)
        steps = (self.params or {}).get("steps")
        if offset and steps and self._tfpar_steps_done >= steps and not self.model.stop_training:
            self.model.stop_training = True  # the resumed epoch ends after the steps it still owed
            self._tfpar_cut = True
        return result

    def on_epoch_end(self, epoch, logs=None):
        if getattr(self, "_tfpar_cut", False):
            self.model.stop_training = False  # only the epoch ended, not the training
            self._tfpar_cut = False
        self._tfpar_steps_done = 0
        self._tfpar_offset = 0
        return originals["on_epoch_end"](self, epoch, logs)

    def _save_model(self):
        result = originals["_save_model"](self)
        meta = _read_json(self._training_metadata_path)
        if meta is not None:
            meta[METADATA_KEY] = {"steps_done": getattr(self, "_tfpar_steps_done", 0),
                               "signature": weights_signature(self.model), "keras_version": keras.__version__}
            _write_json_atomic(self._training_metadata_path, meta)
        return result

    for name, fn in (("_load_model", _load_model), ("on_epoch_begin", on_epoch_begin),
                     ("on_train_batch_end", on_train_batch_end), ("on_epoch_end", on_epoch_end),
                     ("_save_model", _save_model)):
        fn.__tfpar_original__ = originals[name]
        setattr(cls, name, fn)
