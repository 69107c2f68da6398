"""Backups on disk: one layout, written only by the chief, atomically, for every tfpar checkpoint.

tfpar's ``BackupAndRestore`` (``tfpar.runtime.backup``), the parameter-server
chief's checkpoints (``tfpar.parallel.parameter_server.checkpoints``) and
``ShardedTrainer.save`` write through ``write`` below; the Keras saving fixes
(``tfpar.kerasfix.saving``) share its chief-only rule and its refusal:

* only the chief writes. Every other worker still takes part in a save
  (under ``MultiWorkerMirroredStrategy`` reading variables may run
  collectives) but writes into a private temporary directory that is
  removed at once (``worker_temp_dir``);
* a backup is written under a ``.tmp-`` name and renamed into place when
  complete (``staged``), so a crash mid-save leaves the previous one loadable;
* a backup recorded for another model or cluster is refused in one sentence
  naming what differs (``refuse_foreign``, ``check_compatible``).

Layout of a backup directory::

    step-000000120/            one backup: a tf.train.Checkpoint + backup.json
      ckpt.index  ckpt.data-00000-of-00001  backup.json
    .tmp-step-000000140-1234/  a save in progress (or a crash mid-save)

``backup.json`` records the sizes and CRC-32 of the checkpoint files, the
epoch and step, the number of workers (``null``: any number may resume it)
the model's signature and, for elastic resumes, the run's strategy family,
examples per update and examples trained; a backup whose files do not match is skipped in
favour of the previous one. Imports no TensorFlow: the callers pass the
function that writes the checkpoint.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib

from tfpar.core.summary import write_json_atomic

log = logging.getLogger("tfpar")

FORMAT = 1
METADATA = "backup.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
CKPT = "ckpt"
REMEDY = "use a new model_dir or backup_dir, or delete that backup to start over"


@dataclasses.dataclass(frozen=True)
class Backup:
    """One complete backup on disk."""

    path: str
    step: int  # global training steps done
    epoch: int  # epochs fully done
    batch: int  # steps done in epoch ``epoch`` (0 at an epoch boundary)
    num_workers: object  # the workers that wrote it; None when any number may resume it
    signature: dict
    run: dict = dataclasses.field(default_factory=dict)  # family, examples_per_update, examples (elastic resume)

    @property
    def checkpoint_prefix(self):
        return os.path.join(self.path, CKPT)


# ------------------------------------------------------------------ reading


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _describe_files(directory):
    return {name: {"bytes": os.path.getsize(os.path.join(directory, name)), "crc32": _crc32(os.path.join(directory, name))}
            for name in sorted(os.listdir(directory)) if name != METADATA}


def read(path):
    """The ``Backup`` in directory ``path``, or the reason it is unusable (a string)."""
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
        workers = meta["num_workers"]
        return Backup(path, int(meta["step"]), int(meta["epoch"]), int(meta["batch"]),
                      None if workers is None else int(workers), dict(meta["signature"]), dict(meta.get("run") or {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable metadata ({err})"


def step_dirs(backup_dir):
    """The ``step-*`` directories in ``backup_dir``, newest first."""
    try:
        names = os.listdir(backup_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(name[len(PREFIX):]), os.path.join(backup_dir, name))
             for name in names if name.startswith(PREFIX) and name[len(PREFIX):].isdigit()]
    return [path for _, path in sorted(found, reverse=True)]


def latest(backup_dir):
    """The newest intact ``Backup`` in ``backup_dir`` (None if there is none).

    Damaged backups (a truncated file, a failed checksum) are skipped with a
    warning. If backups exist but none is intact, raise ``ValueError``.
    """
    problems = []
    for path in step_dirs(backup_dir):
        found = read(path)
        if isinstance(found, Backup):
            for skipped in problems:
                log.warning("tfpar: skipping damaged backup %s", skipped)
            return found
        problems.append(f"{path}: {found}")
    if problems:
        raise ValueError(
            f"No intact backup in {backup_dir} ({'; '.join(problems)}); "
            f"delete {backup_dir} to train from scratch."
        )
    return None


# ------------------------------------------------------------------ refusing a foreign backup


def differences(recorded, current):
    """``"k='theirs', this run has k='ours'"`` for each key both dicts hold with other values ("" if none)."""
    differing = sorted(k for k in current if k in recorded and recorded[k] != current[k])
    if not differing:
        return ""
    theirs = ", ".join(f"{k}={recorded[k]!r}" for k in differing)
    ours = ", ".join(f"{k}={current[k]!r}" for k in differing)
    return f"{theirs}, this run has {ours}"


def weights_signature(model):
    """What a checkpoint must match to load into ``model``: optimizer class, weight shapes and dtypes, in order."""
    shapes = [[list(v.shape), str(v.dtype)] for v in model.weights]
    text = json.dumps([type(model.optimizer).__name__, shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def refuse_foreign(directory, recorded, current, remedy=REMEDY):
    """Raise ``ValueError`` when the backup's recorded signature differs from this run's, naming what differs."""
    differing = differences(recorded, current)
    if differing:
        raise ValueError(f"The backup in {directory} is of another model ({differing}); {remedy}.")


def check_compatible(backup, signature, num_workers):
    """Raise ``ValueError`` when ``backup`` belongs to another model or cluster shape."""
    directory = os.path.dirname(backup.path)
    refuse_foreign(directory, backup.signature, signature)
    if backup.num_workers is not None and backup.num_workers != num_workers:
        raise ValueError(
            f"The backup in {directory} was written by {backup.num_workers} worker(s) but "
            f"this cluster has {num_workers}; restart with {backup.num_workers} workers, or delete that backup "
            f"to start over."
        )


# ------------------------------------------------------------------ writing


@contextlib.contextmanager
def worker_temp_dir(task_name, what):
    """A private temporary directory for a non-chief worker's copy of ``what``; removed on exit."""
    path = tempfile.mkdtemp(prefix=f"tfpar-{what}-{task_name}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged(final, replace=True):
    """A ``.tmp-`` directory beside ``final`` that is renamed to ``final`` when the block succeeds.

    ``replace=False``: when ``final`` already exists (another process won the
    race) the staged copy is dropped instead.
    """
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(final)}-", dir=parent)
    old = None
    try:
        yield work
        if os.path.exists(final) and replace:
            old = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=parent)
            os.rename(final, os.path.join(old, "previous"))
        try:
            os.rename(work, final)  # atomic: the backup appears whole or not at all
            work = None
        except OSError:
            if replace or not os.path.isdir(final):
                raise
    finally:
        for path in (work, old):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


def write(backup_dir, save, *, step, epoch=0, batch=0, steps_per_epoch=None, num_workers=None,
          signature=None, is_chief=True, task_name="worker-0", max_to_keep=None, run=None):
    """Write backup ``step-<step>`` of ``backup_dir``; return its ``Backup``.

    ``save(prefix)`` writes the checkpoint files at ``prefix``. It runs on
    every worker (a save may be a collective); only the chief's files are
    kept, renamed into place with ``backup.json``, and then all but the
    newest ``max_to_keep`` backups are deleted.
    """
    final = os.path.join(os.path.abspath(backup_dir), f"{PREFIX}{step:09d}")
    made = Backup(final, step, epoch, batch, num_workers, dict(signature or {}), dict(run or {}))
    if not is_chief:
        with worker_temp_dir(task_name, "backup") as tmp:
            save(os.path.join(tmp, CKPT))
        return made
    with staged(final) as work:
        save(os.path.join(work, CKPT))
        write_json_atomic(os.path.join(work, METADATA), {
            "format": FORMAT, "step": step, "epoch": epoch, "batch": batch, "steps_per_epoch": steps_per_epoch,
            "num_workers": num_workers, "signature": made.signature, "run": made.run, "time": time.time(),
            "files": _describe_files(work)})
    if max_to_keep:
        prune(backup_dir, max_to_keep)
    log.info("tfpar: backup saved %s", final)
    return made


# ------------------------------------------------------------------ cleaning up


def prune(backup_dir, keep):
    """Delete all but the newest ``keep`` backups."""
    for path in step_dirs(backup_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(backup_dir):
    """Delete saves a crash left half-written (``.tmp-*``)."""
    for name in os.listdir(backup_dir) if os.path.isdir(backup_dir) else []:
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(backup_dir, name), ignore_errors=True)


def remove(backup_dir):
    """Delete the backups in ``backup_dir`` (and the directory, if that leaves it empty)."""
    for path in step_dirs(backup_dir):
        shutil.rmtree(path, ignore_errors=True)
    remove_stale_tmp(backup_dir)
    try:
        os.rmdir(backup_dir)
    except OSError:
        pass
