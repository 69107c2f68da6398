"""Ray Train as the engine: tfpar's training as ``train_loop_per_worker`` under ``TensorflowTrainer``, Keras 3.

Ray's ``TensorflowTrainer`` starts the workers, gives each a ``TF_CONFIG``
and restarts the whole group on a failure (``FailureConfig``), but it sets
``TF_USE_LEGACY_KERAS=1`` (Keras 2) because Keras 3's multi-worker ``fit``
fails (ray-project/ray#47464). Each worker here unsets it and runs
``tfpar.train.run``, whose ``MultiWorkerMirroredStrategy`` applies tfpar's
compat fixes (``tfpar.compat``) in that worker.

* Metrics: every worker calls ``ray.train.report`` at every epoch end (Ray
  needs all workers to report equally often); Ray keeps the chief's.
* Checkpoints: the chief attaches its newest tfpar backup
  (``tfpar.runtime.backup``, the ``step-*`` directory) as a Ray ``Checkpoint``. When
  Ray restarts the group, each worker puts Ray's latest checkpoint back into
  ``backup_dir`` if that holds nothing as new, and tfpar resumes from it as
  after any restart.

Needs ``pip install "tfpar[ray]"``.
"""

import dataclasses
import os
import shutil

import keras

MULTI_WORKER = "multi_worker"


def _ray():
    try:
        import ray
        import ray.train
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError:
        raise ValueError('--launcher=ray needs Ray Train: pip install "tfpar[ray]".') from None
    return ray, ray.train, TensorflowTrainer


def worker_config(config):
    """The config each Ray worker trains with: multi-worker, launched already, absolute paths."""
    from tfpar.run.config import TrainConfig

    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config)
    if values.get("strategy", "auto") not in ("auto", MULTI_WORKER):
        raise ValueError(f"--launcher=ray trains with --strategy=multi_worker (Ray starts one process per "
                         f"worker); got --strategy={values['strategy']}.")
    values.update(strategy=MULTI_WORKER, launcher="")
    values["model_dir"] = os.path.abspath(values.get("model_dir") or TrainConfig.model_dir)
    if values.get("backup_dir"):
        values["backup_dir"] = os.path.abspath(values["backup_dir"])
    return TrainConfig(**values).validate()


def check_before_ray(config, num_workers):
    """The user errors a worker would find (data, model_dir, a foreign backup), found before Ray starts:
    one sentence (exit 2) instead of a worker traceback that Ray retries ``max_failures`` times."""
    from tfpar.runtime import backup, cluster, elastic
    from tfpar.run import data, driver as train

    data.inspect(config.data, config.num_classes, config.seed)
    train.check_model_dir(config)
    backup.for_run(config, cluster.ClusterInfo(num_workers=num_workers, source="explicit"), print_fn=None,
                   family=elastic.family(config.strategy))  # as the workers will: another worker count may resume


def backup_dir_of(config):
    return config.backup_dir or os.path.join(config.model_dir, "backup")


def restore_ray_checkpoint(checkpoint, backup_dir):
    """Put a Ray checkpoint (a tfpar backup) into ``backup_dir`` unless a backup as new is there.

    Every worker may call this at once on shared storage: each copies to its
    own temporary name and renames (``backup_store.staged``); the first rename
    wins, the rest drop their copy. Returns the backup directory used, or None.
    """
    from tfpar.core import backup_store

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as source:
        found = backup_store.read(source)
        if not isinstance(found, backup_store.Backup):
            raise ValueError(f"Ray's checkpoint {checkpoint.path} is not a tfpar backup ({found}).")
        have = backup_store.latest(backup_dir)
        if have is not None and have.step >= found.step:
            return have.path
        final = os.path.join(backup_dir, f"{backup_store.PREFIX}{found.step:09d}")
        with backup_store.staged(final, replace=False) as work:
            for name in os.listdir(source):
                shutil.copy2(os.path.join(source, name), os.path.join(work, name))
        return final


class ReportToRay(keras.callbacks.Callback):
    """``ray.train.report`` at every epoch end; the chief attaches its newest tfpar backup as a Checkpoint."""

    def __init__(self, backup_dir, is_chief):
        super().__init__()
        self.backup_dir = backup_dir
        self.is_chief = is_chief

    def on_epoch_end(self, epoch, logs=None):
        from ray import train as ray_train

        from tfpar.core import backup_store

        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        metrics["epoch"] = epoch + 1
        newest = backup_store.latest(self.backup_dir) if self.is_chief else None
        checkpoint = ray_train.Checkpoint.from_directory(newest.path) if newest is not None else None
        ray_train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config):
    """What each Ray worker runs: Keras 3 (not Ray's legacy Keras 2), Ray's checkpoint back in place, tfpar's run."""
    os.environ.pop("TF_USE_LEGACY_KERAS", None)  # Ray sets it (Keras 2); tfpar trains with Keras 3
    from ray import train as ray_train

    from tfpar.runtime import cluster
    from tfpar.kerasfix import compat
    from tfpar.run import driver as train
    from tfpar.run.config import TrainConfig

    config = TrainConfig(**loop_config["config"])
    info = cluster.detect()
    restore_ray_checkpoint(ray_train.get_checkpoint(), backup_dir_of(config))
    compat.apply()  # also applied by strategies.create("multi_worker"); idempotent
    callbacks = [ReportToRay(backup_dir_of(config), info.is_chief), *loop_config.get("callbacks", ())]
    print_fn = print if info.is_chief else None
    train.run(config, print_fn=print_fn, callbacks=callbacks)


def max_workers(num_workers):
    """The most workers ``num_workers`` (a count, or Ray's elastic ``(min, max)``) may start; one sentence if bad."""
    def positive(n):
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if positive(num_workers):
        return num_workers
    if isinstance(num_workers, tuple) and len(num_workers) == 2 and all(map(positive, num_workers)) \
            and num_workers[0] <= num_workers[1]:
        return num_workers[1]
    raise ValueError(f"--workers must be a positive integer, or (min, max) with 1 <= min <= max, with "
                     f"--launcher=ray; got {num_workers!r}.")


def train(config, num_workers=2, use_gpu=False, max_failures=3, storage_path=None, name=None, callbacks=()):
    """Train ``config`` (a ``TrainConfig`` or dict of its fields) with ``num_workers`` Ray Train workers.

    Connects to the Ray cluster in ``RAY_ADDRESS`` (or the one already
    initialised; else starts a local one). Ray restarts the whole group up to
    ``max_failures`` times and each restart resumes from the newest backup.
    ``storage_path`` is where Ray keeps its copy of the checkpoints (default
    ``model_dir/ray``; shared storage in a multi-node cluster, like
    ``model_dir``). ``callbacks`` are extra Keras callbacks run in every
    worker. ``num_workers=(min, max)``: Ray Train's elastic scaling (Ray Train
    v2): Ray starts as many workers as it can place, at least ``min``, and
    restarts the group at another size when that changes; each start resumes
    the newest backup on the workers it has (``tfpar.runtime.elastic``).
    Returns the chief's summary (``model_dir/summary.json``) with
    ``ray_checkpoint``, the path of Ray's last checkpoint, and ``ray_metrics``,
    the last metrics reported to Ray.
    """
    most = max_workers(num_workers)
    ray, ray_train, TensorflowTrainer = _ray()
    wconfig = worker_config(config)
    check_before_ray(wconfig, most)
    started = not ray.is_initialized()
    if started:  # the cluster in RAY_ADDRESS, else a local one on loopback for this run
        # address="local": a new cluster, never the one a stale /tmp/ray/ray_current_cluster names
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else
                    {"address": "local", "include_dashboard": False, "_node_ip_address": "127.0.0.1"}))
    try:
        return _fit(ray_train, TensorflowTrainer, wconfig, num_workers, use_gpu, max_failures, storage_path, name,
                    callbacks)
    finally:
        if started:
            ray.shutdown()


def _fit(ray_train, TensorflowTrainer, wconfig, num_workers, use_gpu, max_failures, storage_path, name, callbacks):
    import json

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(wconfig), "callbacks": list(callbacks)},
        scaling_config=ray_train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray_train.RunConfig(
            name=name or "tfpar", storage_path=os.path.abspath(storage_path or os.path.join(wconfig.model_dir, "ray")),
            failure_config=ray_train.FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with open(os.path.join(wconfig.model_dir, "summary.json")) as f:
        summary = json.load(f)
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    summary["ray_metrics"] = dict(result.metrics or {})  # the chief's last ray.train.report
    return summary
