"""Multi-worker-safe backup and restore for ``model.fit``: tfpar's ``BackupAndRestore``.

Keras 3's ``BackupAndRestore`` makes every worker write the same file
(DESIGN.md item 3). Here every worker takes part in each save, because under
``MultiWorkerMirroredStrategy`` reading variables may run collectives, but
only the chief writes into the backup directory. The layout, the atomic
chief-only write, the damaged-backup fallback and the foreign-backup refusal
are ``tfpar.core.backup_store``'s; the mid-epoch cut is
``tfpar.core.epoch_resume``'s (Keras's own callback, as patched by
``tfpar.kerasfix.saving``, shares both).

Restoring sets ``model._initial_epoch`` (as Keras's own callback does) and,
when the backup was taken mid-epoch, ends the resumed epoch after the steps
it still owed, so epochs keep their length. The optimizer, its ``iterations``
and therefore the learning-rate schedule come back with the checkpoint;
``skip_completed(dataset)`` moves a deterministic input pipeline past the
batches already trained on (``tfpar.train`` instead builds its pipelines
with ``data.make(skip_batches=...)``, which skips before decoding).
"""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from tfpar.core import backup_store as store
from tfpar.core.epoch_resume import EpochResume
from tfpar.runtime import elastic, preemption

FORMAT, METADATA, PREFIX, TMP_PREFIX, CKPT = store.FORMAT, store.METADATA, store.PREFIX, store.TMP_PREFIX, store.CKPT
Backup = store.Backup
read = store.read  # the Backup in one step-* directory, or why it is unusable
latest = store.latest
check_compatible = store.check_compatible
remove = store.remove


# ------------------------------------------------------------------ restoring a checkpoint


def build_optimizer(model):
    """Create the optimizer's slots now, under the model's strategy, so that reading a checkpoint restores them."""
    if not model.optimizer.built:
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)


def read_checkpoint(checkpoint, prefix, backup_dir, options=None):
    """Restore ``checkpoint`` from ``prefix``: every variable must be found there, or one sentence says why not.

    Values the checkpoint holds beyond them (an older layout's bookkeeping) are ignored.
    """
    try:
        checkpoint.read(prefix, options=options).assert_existing_objects_matched().expect_partial()
    except (tf.errors.OpError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"The backup {os.path.dirname(prefix)} could not be restored ({first}); "
            f"delete {backup_dir} to train from scratch."
        ) from None


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
      family: the strategy family (``tfpar.runtime.elastic``); given, a backup of
        the same synchronous family resumes on another number of workers.
      wanted_update, allow_batch_change: the examples per update this run asks
        for explicitly; another one than the backup's is refused unless allowed.

    Set ``examples_per_update`` before ``fit``: backups then record the examples
    trained, so a resume on another worker count starts at the same example.
    """

    def __init__(self, backup_dir, save_freq="epoch", *, is_chief=True, task_name="worker-0",
                 num_workers=1, signature=None, steps_per_epoch=None, keep=False, max_to_keep=2,
                 preemption=True, grace_period=preemption.DEFAULT_GRACE_SEC, print_fn=print, family=None,
                 wanted_update=None, allow_batch_change=False):
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
        self.family = family
        self.examples_per_update = None  # set by the run before fit (elastic resume)
        self.resume = latest(self.backup_dir)
        if self.resume is not None and family is None:
            check_compatible(self.resume, self.signature, num_workers)
        elif self.resume is not None:
            store.refuse_foreign(self.backup_dir, self.resume.signature, self.signature)
            elastic.check(self.resume, self.backup_dir, family, num_workers, wanted_update, allow_batch_change)
        self.resumed = None  # {"epoch", "step", "batch", "path", "workers"} once restored
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

    def resumed_update(self):
        """The examples per update the backup's run trained with (None: no backup, or it did not record them)."""
        return (self.resume.run or {}).get("examples_per_update") if self.resume is not None else None

    def examples_before(self):
        """Examples trained before the backup this run resumes from (0 without one)."""
        if self.resume is None:
            return 0
        recorded = (self.resume.run or {}).get("examples")
        return int(recorded) if recorded is not None else self.resume.step * (self.examples_per_update or 1)

    def examples(self):
        """Examples trained so far in the whole run, resumed ones counted once."""
        done = self._step - (self.resume.step if self.resume is not None else 0)
        return self.examples_before() + done * (self.examples_per_update or 0)

    # --- restore -------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        build_optimizer(model)
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self.steps_per_epoch = self.steps_per_epoch or self.params.get("steps")
        if self.is_chief and os.path.isdir(self.backup_dir):
            store.remove_stale_tmp(self.backup_dir)
        self._step = int(model.optimizer.iterations.numpy())
        self._position = EpochResume()
        if self.resume is not None:
            self._restore(self.resume)
        if self.handle_preemption:
            self._watch = preemption.watch(self.grace_period, print_fn=self.print_fn)

    def _restore(self, backup):
        read_checkpoint(self._checkpoint, backup.checkpoint_prefix, self.backup_dir, self._options())
        self._step = backup.step
        self.model._initial_epoch = backup.epoch
        if backup.batch:
            if not self.steps_per_epoch:
                raise ValueError(f"The backup {backup.path} was taken mid-epoch; resuming it needs steps_per_epoch.")
            done = backup.batch
            theirs = self.resumed_update()
            if theirs and self.examples_per_update and theirs != self.examples_per_update:
                done = round(done * theirs / self.examples_per_update)  # --allow_batch_change: the nearest step
            self._position = EpochResume(resumed_epoch=backup.epoch, done_before=done)
        self.resumed = {"epoch": backup.epoch, "batch": backup.batch, "step": backup.step, "path": backup.path,
                        "workers": backup.num_workers}
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
        self._position.epoch_begin(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self._step += max(1, getattr(self.model, "steps_per_execution", 1) or 1)
        self._position.batch_end(batch, self.model, self.steps_per_epoch)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop_on_nan(float(loss))
        if self._watch is not None and self._watch.agreed(self.model.distribute_strategy):
            self._save(*self._position.position(self.steps_per_epoch))
            self._watch.exit(f"backup saved at step {self._step}" if self.last_saved else "no backup saved")
        if self.save_freq != "epoch" and self._step % self.save_freq == 0:
            self._save(*self._position.position(self.steps_per_epoch))

    def on_epoch_end(self, epoch, logs=None):
        self._position.epoch_end(self.model)
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
            f"The loss became {loss} at step {self._step} (epoch {self._position.epoch + 1}); training stopped "
            f"and {where}; "
            f"lower the learning rate or check the data."
        )

    def _save(self, epoch, batch):
        """Every worker writes (collectives); only the chief's copy is kept, renamed into place."""
        if not _all_finite(self.model.trainable_weights):
            self._stop_on_nan(float("nan"))  # never back up a diverged state
        self.last_saved = store.write(
            self.backup_dir, lambda prefix: self._checkpoint.write(prefix, options=self._options()),
            step=self._step, epoch=epoch, batch=batch, steps_per_epoch=self.steps_per_epoch,
            num_workers=self.num_workers, signature=self.signature, is_chief=self.is_chief,
            task_name=self.task_name, max_to_keep=self.max_to_keep, run=self._run_record())

    def _run_record(self):
        if self.family is None:
            return None
        return {"family": self.family, "examples_per_update": self.examples_per_update, "examples": self.examples()}


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
    differing = store.differences(previous, this_signature)
    if differing:
        raise ValueError(f"model_dir {model_dir} holds a run of another model ({differing}); "
                         f"use a new model_dir.")


def for_run(config, cluster, print_fn=print, family=None):
    """The ``BackupAndRestore`` a ``TrainConfig`` asks for, or None when backups are off.

    ``family`` (``tfpar.runtime.elastic.family``): let a backup of that family
    resume on another number of workers.

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
        print_fn=print_fn if cluster.is_chief else None, family=family,
        wanted_update=(None if config.per_replica_batch_size is not None
                       else config.global_batch_size(1) * config.grad_accum_steps),
        allow_batch_change=config.allow_batch_change,
    )
