"""Multi-worker-safe backup and restore for ``model.fit``.

Keras 3's ``BackupAndRestore`` makes every worker write the same file
(DESIGN.md item 3). Here every worker takes part in each save, because under
``MultiWorkerMirroredStrategy`` reading variables may run collectives, but
only the chief writes into the backup directory; other workers write to a
private temporary directory and delete it at once.

Layout of a backup directory::

    step-000000120/            one backup: a tf.train.Checkpoint + backup.json
      ckpt.index  ckpt.data-00000-of-00001  backup.json
    .tmp-step-000000140-1234/  a save in progress (or a crash mid-save)

A backup is written under a ``.tmp-`` name and renamed into place when
complete, so a crash mid-save leaves the previous backup loadable.
``backup.json`` records the sizes and CRC-32 of the checkpoint files, the
epoch and step, the number of workers and the model's signature; a backup
whose files do not match is skipped in favour of the previous one.

Restoring sets ``model._initial_epoch`` (as Keras's own callback does) and,
when the backup was taken mid-epoch, ends the resumed epoch after the steps
it still owed, so epochs keep their length. The optimizer, its ``iterations``
and therefore the learning-rate schedule come back with the checkpoint;
``skip_completed(dataset)`` moves a deterministic input pipeline past the
batches already trained on (``tfpar.train`` instead builds its pipelines
with ``data.make(skip_batches=...)``, which skips before decoding).
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib

import keras
import numpy as np
import tensorflow as tf

from tfpar.runtime import preemption

log = logging.getLogger("tfpar")

FORMAT = 1
METADATA = "backup.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
CKPT = "ckpt"


@dataclasses.dataclass(frozen=True)
class Backup:
    """One complete backup on disk."""

    path: str
    step: int  # global training steps done
    epoch: int  # epochs fully done
    batch: int  # steps done in epoch ``epoch`` (0 at an epoch boundary)
    num_workers: int
    signature: dict

    @property
    def checkpoint_prefix(self):
        return os.path.join(self.path, CKPT)


# ------------------------------------------------------------------ on disk


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _describe_files(directory):
    return {name: {"bytes": os.path.getsize(os.path.join(directory, name)), "crc32": _crc32(os.path.join(directory, name))}
            for name in sorted(os.listdir(directory)) if name != METADATA}


def _read(path):
    """The ``Backup`` in directory ``path``, or the reason it is unusable."""
    try:
        with open(os.path.join(path, METADATA)) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            return f"unknown format {meta.get('format')!r}"
        for name, want in meta["files"].items():
            file = os.path.join(path, name)
            if not os.path.exists(file):
                return f"{name} is missing"
            if os.path.getsize(file) != want["bytes"]:
                return f"{name} has {os.path.getsize(file)} bytes, expected {want['bytes']}"
            if _crc32(file) != want["crc32"]:
                return f"{name} fails its CRC-32 check"
        return Backup(path, int(meta["step"]), int(meta["epoch"]), int(meta["batch"]),
                      int(meta["num_workers"]), dict(meta["signature"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable metadata ({err})"


def _step_dirs(backup_dir):
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            found.append((int(name[len(PREFIX):]), os.path.join(backup_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def latest(backup_dir):
    """The newest intact ``Backup`` in ``backup_dir`` (None if there is none).

    Damaged backups (a truncated file, a failed checksum) are skipped with a
    warning. If backups exist but none is intact, raise ``ValueError``.
    """
    problems = []
    for path in _step_dirs(backup_dir):
        found = _read(path)
        if isinstance(found, Backup):
            for skipped in problems:
                log.warning("tfpar.backup: skipping damaged backup %s", skipped)
            return found
        problems.append(f"{path}: {found}")
    if problems:
        raise ValueError(
            f"No intact backup in {backup_dir} ({'; '.join(problems)}); "
            f"delete {backup_dir} to train from scratch."
        )
    return None


def check_compatible(backup, signature, num_workers):
    """Raise ``ValueError`` when ``backup`` belongs to another model or cluster shape."""
    mismatched = sorted(k for k in signature if k in backup.signature and backup.signature[k] != signature[k])
    if mismatched:
        theirs = ", ".join(f"{k}={backup.signature[k]!r}" for k in mismatched)
        ours = ", ".join(f"{k}={signature[k]!r}" for k in mismatched)
        raise ValueError(
            f"The backup in {os.path.dirname(backup.path)} is of another model ({theirs}, this run has {ours}); "
            f"use a new model_dir or backup_dir, or delete that backup to start over."
        )
    if backup.num_workers != num_workers:
        raise ValueError(
            f"The backup in {os.path.dirname(backup.path)} was written by {backup.num_workers} worker(s) but "
            f"this cluster has {num_workers}; restart with {backup.num_workers} workers, or delete that backup "
            f"to start over."
        )


def _prune(backup_dir, keep):
    for path in _step_dirs(backup_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_tmp(backup_dir):
    for name in os.listdir(backup_dir) if os.path.isdir(backup_dir) else []:
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(backup_dir, name), ignore_errors=True)


def remove(backup_dir):
    """Delete the backups in ``backup_dir`` (and the directory, if that leaves it empty)."""
    for path in _step_dirs(backup_dir):
        shutil.rmtree(path, ignore_errors=True)
    _remove_stale_tmp(backup_dir)
    try:
        os.rmdir(backup_dir)
    except OSError:
        pass


# ------------------------------------------------------------------ callback


def _all_finite(variables):
    return all(np.all(np.isfinite(np.asarray(v.numpy(), dtype="float64"))) for v in variables)


class BackupAndRestore(keras.callbacks.Callback):
    """Back up the training state every epoch or every N steps; restore it on start.

    Args:
      backup_dir: where the chief keeps backups (shared storage in a cluster:
        every worker restores from it).
      save_freq: ``"epoch"`` or a number of steps.
      is_chief: whether this process writes the real backups.
      num_workers: the cluster's workers, recorded and checked on restore.
      signature: a small dict naming the model (model, width, classes, ...);
        a backup with another signature is refused.
      steps_per_epoch: the epoch length ``fit`` uses (needed to resume mid-epoch).
      keep: keep the backups after a successful finish.
      max_to_keep: backups kept on disk (the newest ones).
      preemption: handle SIGTERM (save, then exit with
        ``preemption.EXIT_PREEMPTED``); all workers agree on the step.
      grace_period: seconds after SIGTERM before exiting even without a save.
    """

    def __init__(self, backup_dir, save_freq="epoch", *, is_chief=True, task_name="worker-0",
                 num_workers=1, signature=None, steps_per_epoch=None, keep=False, max_to_keep=2,
                 preemption=True, grace_period=preemption.DEFAULT_GRACE_SEC, print_fn=print):
        super().__init__()
        if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1):
            raise ValueError(f"backup save_freq must be 'epoch' or a positive number of steps, got {save_freq!r}.")
        self.backup_dir = os.path.abspath(backup_dir)
        self.save_freq = save_freq
        self.is_chief = is_chief
        self.task_name = task_name
        self.num_workers = num_workers
        self.signature = dict(signature or {})
        self.steps_per_epoch = steps_per_epoch  # default: the ``steps`` fit reports
        self.keep = keep
        self.max_to_keep = max(1, max_to_keep)
        self.handle_preemption = preemption
        self.grace_period = grace_period
        self.print_fn = print_fn or (lambda *a, **k: None)
        # Read (not restore) the backup now: no TF needed, and a foreign
        # backup is refused before anything else is written.
        self.resume = latest(self.backup_dir)
        if self.resume is not None:
            check_compatible(self.resume, self.signature, num_workers)
        self.resumed = None  # {"epoch", "step", "batch", "path"} once restored
        self.last_saved = None
        self._watch = None

    # --- data position -------------------------------------------------

    def skip_completed(self, dataset):
        """``dataset`` advanced past the batches trained before the backup.

        Exact for a deterministic pipeline that repeats with a fixed seed
        (one batch per step); a no-op when there is nothing to resume.
        """
        if self.resume is None or not self.resume.step:
            return dataset
        return dataset.skip(self.resume.step)

    # --- restore -------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        if not model.optimizer.built:
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self.steps_per_epoch = self.steps_per_epoch or self.params.get("steps")
        if self.is_chief and os.path.isdir(self.backup_dir):
            _remove_stale_tmp(self.backup_dir)
        self._step = int(model.optimizer.iterations.numpy())
        self._epoch_cut = None  # steps after which the resumed epoch ends
        if self.resume is not None:
            self._restore(self.resume)
        if self.handle_preemption:
            self._watch = preemption.watch(self.grace_period, print_fn=self.print_fn)

    def _restore(self, backup):
        try:
            self._checkpoint.read(backup.checkpoint_prefix, options=self._options()).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"The backup {backup.path} could not be restored ({first}); "
                f"delete {self.backup_dir} to train from scratch."
            ) from None
        self._step = backup.step
        self.model._initial_epoch = backup.epoch
        if backup.batch:
            if not self.steps_per_epoch:
                raise ValueError(f"The backup {backup.path} was taken mid-epoch; resuming it needs steps_per_epoch.")
            self._epoch_cut = self.steps_per_epoch - backup.batch
        self.resumed = {"epoch": backup.epoch, "batch": backup.batch, "step": backup.step, "path": backup.path}
        self.print_fn(f"resumed from backup {backup.path}: epoch {backup.epoch + 1}, step {backup.step}")

    io_device = None  # one device for all checkpoint file IO: a pipeline's chief keeps remote stages' files

    def _options(self):
        """The same options object every time: a new one would retrace TF's saver function at each backup."""
        if not self.io_device:
            return None
        if getattr(self, "_io_options", None) is None:
            self._io_options = tf.train.CheckpointOptions(experimental_io_device=self.io_device)
        return self._io_options

    # --- during training -----------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batch = self.resumed["batch"] if self.resumed and epoch == self.resumed["epoch"] else 0
        self._cut_now = False

    def on_train_batch_end(self, batch, logs=None):
        steps = max(1, getattr(self.model, "steps_per_execution", 1) or 1)
        self._step += steps
        self._batch += steps
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop_on_nan(float(loss))
        if self._watch is not None and self._watch.agreed(self.model.distribute_strategy):
            self._save(*self._position())
            self._watch.exit(f"backup saved at step {self._step}" if self.last_saved else "no backup saved")
        if self.save_freq != "epoch" and self._step % self.save_freq == 0:
            self._save(*self._position())
        if self._epoch_cut is not None and self._epoch == self.resumed["epoch"] and batch + 1 >= self._epoch_cut:
            self.model.stop_training = True  # ends the resumed epoch at its usual length
            self._cut_now = True

    def _position(self):
        """(epochs done, steps done in the current epoch) now; the epoch's last step counts as the next epoch's
        start, or a resumed run would owe that epoch zero steps and train one too many."""
        if self.steps_per_epoch and self._batch >= self.steps_per_epoch:
            return self._epoch + 1, 0
        return self._epoch, self._batch

    def on_epoch_end(self, epoch, logs=None):
        if self._cut_now:
            self.model.stop_training = False  # we only ended the epoch, not the training
            self._cut_now = False
        self._batch = 0
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.is_chief and not self.keep:
            remove(self.backup_dir)

    # --- saving --------------------------------------------------------

    def _stop_on_nan(self, loss):
        where = (f"the last good backup ({self.last_saved.path if self.last_saved else self.resume.path}) is kept"
                 if (self.last_saved or self.resume) else "no backup had been saved yet")
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        raise ValueError(
            f"The loss became {loss} at step {self._step} (epoch {self._epoch + 1}); training stopped and {where}; "
            f"lower the learning rate or check the data."
        )

    def _save(self, epoch, batch):
        """Every worker writes (collectives); only the chief's copy is kept, renamed into place."""
        if not _all_finite(self.model.trainable_weights):
            self._stop_on_nan(float("nan"))  # never back up a diverged state
        name = f"{PREFIX}{self._step:09d}"
        final = os.path.join(self.backup_dir, name)
        if self.is_chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            work = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=self.backup_dir)
        else:
            work = tempfile.mkdtemp(prefix=f"tfpar-backup-{self.task_name}-")
        try:
            self._checkpoint.write(os.path.join(work, CKPT), options=self._options())
            if self.is_chief:
                meta = {"format": FORMAT, "step": self._step, "epoch": epoch, "batch": batch,
                        "steps_per_epoch": self.steps_per_epoch, "num_workers": self.num_workers,
                        "signature": self.signature, "time": time.time(), "files": _describe_files(work)}
                with open(os.path.join(work, METADATA), "w") as f:
                    json.dump(meta, f, indent=2, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(work, final)  # atomic: the backup appears whole or not at all
                work = None
                _prune(self.backup_dir, self.max_to_keep)
                log.info("tfpar.backup: saved %s", final)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        self.last_saved = Backup(final, self._step, epoch, batch, self.num_workers, self.signature)


# ------------------------------------------------------------------ the driver's view


def parse_freq(value):
    """``"epoch"`` or a positive step count from a flag value such as ``"epoch"``, ``"50"``, ``50``."""
    if value == "epoch":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = 0
    if steps < 1 or isinstance(value, bool):
        raise ValueError(f"backup_freq must be 'epoch' or a positive number of steps, got {value!r}.")
    return steps


def signature(config):
    """What makes a backup belong to this model: restoring any other would fail or mislead."""
    return {"model": config.model, "num_classes": config.num_classes, "image_size": config.image_size,
            "width_multiplier": config.width_multiplier, "optimizer": config.optimizer}


def check_model_dir(model_dir, this_signature):
    """Refuse a model_dir whose summary.json is another model's: its weights and summaries would be overwritten."""
    try:
        with open(os.path.join(model_dir, "summary.json")) as f:
            previous = json.load(f).get("config", {})
    except (OSError, ValueError, AttributeError):
        return
    differing = sorted(k for k, v in this_signature.items() if k in previous and previous[k] != v)
    if differing:
        theirs = ", ".join(f"{k}={previous[k]!r}" for k in differing)
        ours = ", ".join(f"{k}={this_signature[k]!r}" for k in differing)
        raise ValueError(f"model_dir {model_dir} holds a run of another model ({theirs}, this run has {ours}); "
                         f"use a new model_dir.")


def for_run(config, cluster, print_fn=print):
    """The ``BackupAndRestore`` a ``TrainConfig`` asks for, or None when backups are off.

    Built before anything is written, so a foreign or damaged backup is
    refused while the model_dir is still as the user left it.
    """
    if config.backup_freq in ("", "none", "off"):
        return None
    return BackupAndRestore(
        config.backup_dir or os.path.join(config.model_dir, "backup"),
        parse_freq(config.backup_freq),
        is_chief=cluster.is_chief, task_name=cluster.task_name, num_workers=cluster.num_workers,
        signature=signature(config), keep=config.keep_backups,
        print_fn=print_fn if cluster.is_chief else None,
    )
