"""Small, version-gated fixes that make Keras 3 ``fit``/``evaluate``/``predict``
work under ``MultiWorkerMirroredStrategy`` (DESIGN.md items 1-2), its
saving (``model.save``, ``ModelCheckpoint``, ``BackupAndRestore``; item 16,
implemented in ``tfpar/kerasfix/saving.py``), and ``fit``/``evaluate`` under
``ParameterServerStrategy`` (item 4, ``tfpar.kerasfix.ps_fit``).

Each fix:
  * names its upstream issue;
  * applies only to Keras 3 on the TensorFlow backend, and only while the
    defect is still in the installed Keras (``present()`` reads the code of
    the function it replaces, so a fixed Keras is left alone);
  * wraps the one Keras trainer function involved and delegates to the
    original for every case the defect does not touch (single worker,
    mirrored, TPU, ...), so nothing changes outside multi-worker runs;
  * is idempotent and logged once.

``apply()`` is public for users who build their own strategy;
``tfpar.strategies.create`` calls it for ``multi_worker`` and ``parameter_server``. Set
``TFPAR_COMPAT_DISABLE=all`` (or a comma-separated list of fix names) to turn
fixes off, e.g. to check whether upstream still needs them.
"""

import dataclasses
import inspect
import logging
import os

from tfpar.core.devices import is_multi_worker, is_parameter_server

log = logging.getLogger("tfpar")

DISABLE_ENV = "TFPAR_COMPAT_DISABLE"


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    upstream: str
    summary: str
    present: object  # () -> bool: is the defect in the installed Keras?
    install: object  # () -> None


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _keras_needs_fixes():
    import keras

    return keras.__version__.startswith("3.") and keras.backend.backend() == "tensorflow"


def _source(fn):
    while hasattr(fn, "__tfpar_original__"):  # Keras's own code, under every tfpar wrapper
        fn = fn.__tfpar_original__
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


# --- keras-team/keras#20585: _maybe_symbolic_build reduces a PerReplica batch --

def _symbolic_build_present():
    source = _source(_trainer_module().TensorFlowTrainer._maybe_symbolic_build)
    return "distribute_strategy.reduce(" in source


def _install_symbolic_build():
    """Build from the first local replica's batch instead of a cross-worker MEAN.

    The first batch is only needed for its shapes and dtypes; Keras reduces it
    with ``strategy.reduce("MEAN", ...)``, which fails for a PerReplica batch in
    multi-worker mode ("Attempt to convert a value (PerReplica ...)").
    """
    import tensorflow as tf
    from keras.src import tree

    trainer_cls = _trainer_module().TensorFlowTrainer
    original = trainer_cls._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and is_multi_worker(strategy):
            for *_, it in iterator:  # (step, it) in Keras 3.10; (begin, end, it) in 3.15
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    next(it),
                )
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    _maybe_symbolic_build.__tfpar_original__ = original
    trainer_cls._maybe_symbolic_build = _maybe_symbolic_build


# --- tensorflow/tensorflow#72388: reduce_per_replica uses axis=0 on scalar logs --

def _scalar_reduce_present():
    source = _source(_trainer_module().reduce_per_replica)
    return 'strategy.reduce("MEAN", v, axis=0)' in source


def _install_scalar_reduce():
    """Mean per-replica *scalar* logs across replicas with ``axis=None``.

    Keras's multi-worker branch reduces every value with ``axis=0``, which a
    scalar loss or metric does not have ("Invalid reduction dimension 0 for
    input with 0 dimensions"). Non-scalars and every other case go to Keras.
    """
    import tensorflow as tf
    from keras.src import tree

    module = _trainer_module()
    original = module.reduce_per_replica

    def _rank(v, strategy):
        first = strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
        return getattr(getattr(first, "shape", None), "rank", None)

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return original(values, strategy, reduction)

        def _reduce(v):
            if _rank(v, strategy) == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return tree.map_structure(_reduce, values)

    reduce_per_replica.__tfpar_original__ = original
    module.reduce_per_replica = reduce_per_replica


# --- BatchNormalization moving statistics diverge across workers -------------

def _bn_moving_stats_present():
    import keras

    source = _source(keras.layers.BatchNormalization.build)
    return 'name="moving_mean"' in source and "aggregation" not in source


def _install_bn_moving_stats():
    """Create BatchNormalization's non-trainable statistics with ``aggregation="mean"``.

    Keras 3 creates ``moving_mean``/``moving_variance`` with aggregation
    ``none``, so under ``MultiWorkerMirroredStrategy`` each worker updates its
    own copy from its own shard and the workers end with different models
    (tf_keras averaged them). With ``mean`` every update is all-reduced, so all
    copies stay equal: the moving average of the replicas' batch statistics.
    Only weights created under a multi-worker strategy are affected.
    """
    import keras
    import tensorflow as tf

    bn_cls = keras.layers.BatchNormalization
    original = bn_cls.add_weight

    def add_weight(self, *args, **kwargs):
        if (not kwargs.get("trainable", True) and kwargs.get("aggregation", "none") == "none"
                and not getattr(self, "synchronized", False)
                and is_multi_worker(tf.distribute.get_strategy())):
            kwargs["aggregation"] = "mean"
        return original(self, *args, **kwargs)

    add_weight.__tfpar_original__ = original
    bn_cls.add_weight = add_weight


# --- LossScaleOptimizer: workers disagree on "finite" and hang -----------------

def _loss_scale_finite_present():
    from keras.src.optimizers import loss_scale_optimizer

    return "all_reduce" not in _source(loss_scale_optimizer.LossScaleOptimizer.check_finite)


def _install_loss_scale_finite():
    """Make every replica of a multi-worker run agree on whether the gradients are finite.

    Keras checks its *local, not yet all-reduced* gradients (its own comment
    assumes they were all-reduced) and branches on the result. When only one
    worker overflows in float16, that worker skips the step while the others
    enter the gradient all-reduce and wait for it forever. Summing a
    "non-finite" flag across replicas first makes all of them take the same
    branch: one scalar all-reduce per step.
    """
    import tensorflow as tf
    from keras.src.optimizers import loss_scale_optimizer

    cls = loss_scale_optimizer.LossScaleOptimizer
    original = cls.check_finite

    def check_finite(self, grads):
        finite = original(self, grads)
        context = tf.distribute.get_replica_context()
        if context is None or not is_multi_worker(context.strategy):
            return finite
        nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        return nonfinite < 0.5

    check_finite.__tfpar_original__ = original
    cls.check_finite = check_finite


# --- Keras 3 saving has no chief (DESIGN.md item 16); code in tfpar/kerasfix/saving.py --

def _no_chief(source):
    return "should_checkpoint" not in source and "chief" not in source


def _model_save_present():
    from keras.src.saving import saving_api

    return _no_chief(_source(saving_api.save_model) + _source(saving_api.save_weights))


def _model_checkpoint_present():
    import keras

    source = _source(keras.callbacks.ModelCheckpoint._save_model)
    return "self.model.save" in source and _no_chief(source)


def _backup_chief_present():
    import keras

    cls = keras.callbacks.BackupAndRestore
    source = _source(cls._save_model)
    return ("save_weights(" in source and _no_chief(source + _source(cls.on_train_end))
            and "_weights_path" in _source(cls.__init__))


def _backup_resume_present():
    import keras

    source = _source(keras.callbacks.BackupAndRestore._load_model)
    return "_initial_epoch" in source and '"batch"' not in source and "'batch'" not in source


def _install(name):
    def install():
        from tfpar.kerasfix import saving as worker_saving

        getattr(worker_saving, name)()

    return install


# --- keras-team/keras#18624: fit/evaluate have no ParameterServerStrategy path ---

PS_FIT = "parameter_server_fit"


def ps_fit_needed():
    """True while the installed Keras's TF trainer has no ClusterCoordinator path in ``fit``."""
    return "coordinator" not in _source(_trainer_module().TensorFlowTrainer.fit).lower()


def _install_ps_fit():
    """Send ``fit``/``evaluate`` of a model under ``ParameterServerStrategy`` to ``tfpar.kerasfix.ps_fit``.

    Keras 3 hands the dataset to ``experimental_distribute_dataset`` and stops
    ("you need to pass this dataset to ClusterCoordinator.create_per_worker_dataset").
    Every other strategy calls Keras's own methods unchanged.
    """
    from tfpar.kerasfix import ps_fit

    trainer_cls = _trainer_module().TensorFlowTrainer
    for name in ("fit", "evaluate"):
        original = getattr(trainer_cls, name)
        ours = getattr(ps_fit, name)

        def method(self, *args, _original=original, _ours=ours, **kwargs):
            if is_parameter_server(self.distribute_strategy):
                return _ours(self, *args, **kwargs)
            return _original(self, *args, **kwargs)

        method.__name__, method.__doc__ = original.__name__, original.__doc__
        method.__tfpar_original__ = original
        setattr(trainer_cls, name, method)


FIXES = (
    Fix("symbolic_build_reduce", "keras-team/keras#20585",
        "build the model from a local replica's first batch in multi-worker fit/evaluate",
        _symbolic_build_present, _install_symbolic_build),
    Fix("scalar_log_reduce", "tensorflow/tensorflow#72388",
        "reduce scalar multi-worker logs with axis=None",
        _scalar_reduce_present, _install_scalar_reduce),
    Fix("bn_moving_stats_mean", "no upstream issue yet (tf_keras averaged them)",
        "all-reduce BatchNormalization moving statistics so workers keep equal copies",
        _bn_moving_stats_present, _install_bn_moving_stats),
    Fix("loss_scale_finite_agreement", "no upstream issue found (Keras assumes all-reduced gradients)",
        "all workers agree on skipping a float16 step with non-finite gradients instead of hanging",
        _loss_scale_finite_present, _install_loss_scale_finite),
    Fix("model_save_chief_only", "no upstream issue found (tf_keras: the tutorial's write_filepath)",
        "model.save/save_weights under multi-worker: only the chief writes the path, others a temporary directory",
        _model_save_present, _install("install_model_save")),
    Fix("model_checkpoint_chief_only", "no upstream issue found (tf_keras ModelCheckpoint did this)",
        "ModelCheckpoint under multi-worker: only the chief writes filepath, others a temporary directory",
        _model_checkpoint_present, _install("install_model_checkpoint")),
    # Before backup_chief_only: that one's _save_model wraps this one's, so a non-chief's metadata goes to its temp dir.
    Fix("backup_resume_step", "no upstream issue found (Keras records the batch, restores only the epoch)",
        "BackupAndRestore resumes at the saved epoch and step; a foreign backup_dir is refused",
        _backup_resume_present, _install("install_backup_resume")),
    Fix("backup_chief_only", "no upstream issue found (DESIGN.md item 16; tf_keras let only the chief write)",
        "BackupAndRestore under multi-worker: only the chief writes and deletes, every worker restores its files",
        _backup_chief_present, _install("install_backup_chief_only")),
    Fix(PS_FIT, "keras-team/keras#18624",
        "model.fit/evaluate under ParameterServerStrategy through a ClusterCoordinator (tfpar.kerasfix.ps_fit)",
        ps_fit_needed, _install_ps_fit),
)
NAMES = tuple(f.name for f in FIXES)
# Fixes that need a layer above this one; tfpar.parallel.fixes installs them (tfpar.compat.apply is that one).
ABOVE = ("keras_distribution_tf",)

_applied = set()
_logged = set()


def _disabled(environ):
    raw = environ.get(DISABLE_ENV, "").strip()
    if not raw:
        return set()
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if "all" in names:
        return set(NAMES + ABOVE)
    unknown = names - set(NAMES + ABOVE)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown fix(es) {', '.join(sorted(unknown))}; "
                         f"accepted: all, {', '.join(NAMES + ABOVE)}.")
    return names


def disabled(environ=None):
    """The fix names ``TFPAR_COMPAT_DISABLE`` turns off (checked: an unknown name is one sentence)."""
    return _disabled(os.environ if environ is None else environ)


def _log_once(key, message, *args):
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def apply(environ=None):
    """Install every fix the installed Keras still needs; return the names now active.

    Safe to call any number of times.
    """
    env = os.environ if environ is None else environ
    disabled = _disabled(env)
    if not _keras_needs_fixes():
        _log_once("not-needed", "tfpar.compat: no fixes for this Keras version/backend")
        return sorted(_applied)
    for fix in FIXES:
        if fix.name in _applied:
            continue
        if fix.name in disabled:
            _log_once(fix.name, "tfpar.compat: %s (%s) disabled by %s", fix.name, fix.upstream, DISABLE_ENV)
            continue
        if not fix.present():
            _log_once(fix.name, "tfpar.compat: %s (%s) not needed; this Keras is fixed", fix.name, fix.upstream)
            continue
        fix.install()
        _applied.add(fix.name)
        _log_once(fix.name, "tfpar.compat: applied %s (%s): %s", fix.name, fix.upstream, fix.summary)
    return sorted(_applied)


def applied():
    """Names of the fixes installed in this process."""
    return sorted(_applied)
