"""Keras 3 ``model.fit`` / ``model.evaluate`` under ``ParameterServerStrategy``.

Keras 3 has no parameter-server path (keras-team/keras#18624): ``fit`` hands
the dataset to ``strategy.experimental_distribute_dataset`` and stops with
"To use this dataset, you need to pass this dataset to
ClusterCoordinator.create_per_worker_dataset". ``tfpar.compat`` routes
``fit``/``evaluate`` of a model built under a ``ParameterServerStrategy`` here;
every other strategy keeps Keras's own code.

What this does, as tf_keras did:

* ``fit`` schedules a compiled train function on whichever worker is free,
  through the strategy's ``tf.distribute.coordinator.ClusterCoordinator``;
  with ``steps_per_execution=K`` one scheduled function runs K steps.
* Each worker reads its own copy of the input: a ``tf.data.Dataset`` (rebuilt
  on every worker by ``create_per_worker_dataset``) or a function
  ``input_context -> tf.data.Dataset`` (Keras 3's stand-in for tf_keras's
  ``DatasetCreator``), which ``distribute_datasets_from_function`` calls on
  each worker. Finite datasets are repeated: an epoch is ``steps_per_epoch``
  steps, which ``fit`` therefore needs.
* Epoch logs are exact. Keras metrics update their variables with
  read-then-assign, which loses updates when workers run concurrently (so does
  ``optimizer.iterations``, DESIGN.md item 14). Here each scheduled function
  starts the loss and compiled metrics from a reset state, updates them
  statelessly and returns how the state changed; the coordinator adds the
  changes of every finished function and computes the results. The finished steps are counted
  on the coordinator, and ``optimizer.iterations`` is set to that count after
  each epoch, when no step is in flight.
* Batch-level callback hooks run once per scheduled function, with empty
  logs (the step has not finished when it is scheduled); epoch hooks get the
  exact logs. ``BackupAndRestore`` works: the coordinator is the only process
  that runs callbacks, and it reads and writes the variables on the ps tasks.
* ``evaluate`` (and ``fit``'s validation) runs exactly once over the data on
  the coordinator, reading the current variables from the ps tasks.
* A lost worker is survived (the coordinator re-runs its functions
  elsewhere); a lost parameter server raises
  ``tfpar.kerasfix.ps_variables.ParameterServerError``.
"""

import logging
import time
import weakref

import numpy as np

from tfpar.kerasfix import ps_variables
from tfpar.kerasfix import saving as worker_saving
from tfpar.step import builder, pieces
from tfpar.step import plan as plans

log = logging.getLogger("tfpar")

_FUNCTIONS = weakref.WeakKeyDictionary()  # model -> {key: tf.function}, traced once per model


def _cached(model, key, make):
    functions = _FUNCTIONS.setdefault(model, {})
    if key not in functions:
        functions[key] = make()
    return functions[key]


#: fit/evaluate arguments that only make sense for in-memory arrays.
_ARRAY_ONLY = ("y", "sample_weight", "class_weight", "validation_split", "batch_size")


def coordinator_for(strategy):
    """The strategy's ``ClusterCoordinator`` (TF keeps one per strategy)."""
    import tensorflow as tf

    return tf.distribute.coordinator.ClusterCoordinator(strategy)


# ------------------------------------------------------------------ inputs


def _check_input(x, role):
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset) or (callable(x) and not isinstance(x, type)):
        return
    raise ValueError(
        f"Under ParameterServerStrategy, {role} takes a tf.data.Dataset or a function "
        f"input_context -> tf.data.Dataset; got {type(x).__name__}."
    )


def _repeated(dataset):
    import tensorflow as tf

    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        return dataset
    return dataset.repeat()


def _per_worker_iterator(coordinator, x):
    """An iterator over ``x`` on every worker (``create_per_worker_dataset``)."""
    strategy = coordinator.strategy
    if hasattr(x, "element_spec"):
        per_worker = _repeated(x)  # serialized and rebuilt on every worker
    else:
        def per_worker():
            return strategy.distribute_datasets_from_function(lambda context: _repeated(x(context)))
    return iter(coordinator.create_per_worker_dataset(per_worker))


def _local_dataset(x):
    """``x`` as a dataset read on the coordinator (evaluation, building the model)."""
    import tensorflow as tf

    return x if isinstance(x, tf.data.Dataset) else x(tf.distribute.InputContext())


# ------------------------------------------------------------------ metrics


def _trainer_class():
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return TensorFlowTrainer


def _uses_default_train_step(model):
    return type(model).train_step is _trainer_class().train_step


class _StateSum:
    """Adds the metric-state changes that finished functions return; results like ``get_metrics_result``."""

    def __init__(self, model):
        self.model = model
        self.metrics = pieces.tracked_metrics(model)
        self.initial = [[np.asarray(v) for v in m.stateless_reset_state()] for m in self.metrics]
        self.total = [[v.copy() for v in state] for state in self.initial]

    def add(self, deltas):
        """Add one function's change of every metric state (summed over its steps and replicas)."""
        for total, delta in zip(self.total, deltas):
            for i, value in enumerate(delta):
                total[i] = total[i] + np.asarray(value)

    def results(self):
        logs = {}
        for metric, state in zip(self.metrics, self.total):
            result = metric.stateless_result([np.asarray(v, dtype=v.dtype) for v in state])
            if isinstance(result, dict):
                logs.update(result)
            else:
                logs[metric.name] = result
        return {k: float(np.asarray(v)) if np.asarray(v).ndim == 0 else np.asarray(v) for k, v in logs.items()}


# ------------------------------------------------------------------ step functions


def _train_function(model, steps):
    """A ``tf.function`` a worker runs: ``steps`` train steps; returns how they changed the metric states.

    Each replica's step starts the metrics from their reset state and returns
    the change; the changes are summed over the worker's replicas and steps
    (Keras's loss, mean, sum, accuracy and confusion-matrix metrics all keep
    additive states), and the coordinator adds those of every function.
    """
    import tensorflow as tf

    strategy = model.distribute_strategy
    default_step = _uses_default_train_step(model)
    plan = plans.of(model)
    plan.partitioned, plan.staleness = True, staleness_counters(model)  # weights on several ps tasks; counted updates
    step = builder.delta_step(model)

    def replica_step(data):
        if default_step:
            return step(data)
        initial = [m.stateless_reset_state() for m in pieces.tracked_metrics(model)]
        model.train_step(data)  # a custom step keeps Keras's stateful metrics
        return [[tf.zeros_like(v) for v in state] for state in initial]

    @tf.function
    def function(iterator):
        total = None
        for _ in range(steps):
            deltas = strategy.run(replica_step, args=(next(iterator),))
            deltas = tf.nest.map_structure(lambda d: strategy.reduce("SUM", d, axis=None), deltas)
            total = deltas if total is None else tf.nest.map_structure(tf.add, total, deltas)
        return total

    return function


def staleness_counters(model):
    """Two int64 variables on the ps tasks: updates applied, and the summed staleness of their gradients.

    A gradient's staleness is how many other updates were applied between
    its step reading the weights and its own update (0 when no other worker
    updated in between). ``assign_add`` is atomic on the variable, so the
    counts are exact where Keras's ``iterations`` loses increments.
    """
    import tensorflow as tf

    def make():
        with model.distribute_strategy.scope():
            return (tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_updates"),
                    tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_staleness_sum"))

    return _cached(model, "staleness", make)


def mean_staleness(model):
    """The mean staleness of the gradients applied so far (None before any default-step update)."""
    updates, stale = (int(v.numpy()) for v in staleness_counters(model))
    return stale / updates if updates else None


def _test_function(model):
    """One evaluation batch on the coordinator: the metric states after it."""
    import tensorflow as tf

    custom = type(model).test_step is not _trainer_class().test_step

    @tf.function(reduce_retracing=True)
    def function(data, states):
        if custom:
            model.test_step(data)  # Keras's stateful metrics: exact here, on the one coordinator
            return states
        x, y, sample_weight = pieces.unpack(data)
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        return pieces.update_states(model, states, x, y, y_pred, sample_weight, loss)

    return function


# ------------------------------------------------------------------ fit / evaluate


def _build(model, x):
    """Build the model, compiled metrics and optimizer (slots on the ps tasks) from one local batch."""

    if not (model.built and model.optimizer.built and all(
            getattr(m, "built", True) for m in pieces.tracked_metrics(model))):
        for batch in _local_dataset(x).take(1):
            model._maybe_symbolic_build(data_batch=batch)
    ps_variables.support_sharded_variables(model.optimizer)


def _resume_hint(callbacks):
    import keras

    where = []
    for cb in callbacks:
        if isinstance(cb, keras.callbacks.BackupAndRestore):
            where.append(f"BackupAndRestore resumes from {cb.backup_dir}")
        elif hasattr(cb, "resume_hint"):
            where.append(cb.resume_hint())
    return "; ".join(where) or "no BackupAndRestore callback was given, so the run starts from scratch"


def _check_fit_args(model, x, kwargs, steps_per_epoch, validation_freq):
    _check_input(x, "fit")
    given = [name for name in _ARRAY_ONLY if kwargs.get(name) not in (None, 0, 0.0)]
    if given:
        raise ValueError(f"Under ParameterServerStrategy, fit takes its batches from the dataset; "
                         f"{', '.join(given)} cannot be given.")
    if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) or steps_per_epoch < 1:
        raise ValueError(f"Under ParameterServerStrategy, fit needs steps_per_epoch (a positive integer: "
                         f"each worker repeats its own copy of the data), got {steps_per_epoch!r}.")
    if validation_freq != 1:
        raise ValueError(f"Under ParameterServerStrategy, fit validates after every epoch; "
                         f"validation_freq must be 1, got {validation_freq!r}.")


def fit(model, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
        validation_split=0.0, validation_data=None, shuffle=True, class_weight=None, sample_weight=None,
        initial_epoch=0, steps_per_epoch=None, validation_steps=None, validation_batch_size=None,
        validation_freq=1):
    """``model.fit`` for a model built under ``ParameterServerStrategy``; returns its History."""
    import keras
    import tensorflow as tf


    del shuffle, validation_batch_size  # datasets shuffle themselves
    model._assert_compile_called("fit")
    _check_fit_args(model, x, dict(y=y, sample_weight=sample_weight, class_weight=class_weight,
                                   validation_split=validation_split, batch_size=batch_size),
                    steps_per_epoch, validation_freq)
    if validation_data is not None:
        _check_input(validation_data, "validation_data")
    strategy = model.distribute_strategy
    coordinator = coordinator_for(strategy)
    _build(model, x)
    per_execution = max(1, int(model.steps_per_execution or 1))

    def function_for(steps):
        return _cached(model, ("train", steps), lambda: _train_function(model, steps))

    verbose = 2 if verbose == "auto" else verbose  # per-batch progress means nothing when steps are async
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose, epochs=epochs,
            steps=steps_per_epoch, model=model)
    user_callbacks = list(callbacks.callbacks)
    iterator = _per_worker_iterator(coordinator, x)
    model.stop_training = False
    callbacks.on_train_begin()
    finished = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if model._initial_epoch:
        # A backup restored on_train_begin resumes at this epoch, plus the steps a mid-epoch
        # backup says were scheduled (tfpar.kerasfix.saving); its own iterations count is the
        # in-flight, approximate one.
        finished = model._initial_epoch * steps_per_epoch
    initial_epoch = model._initial_epoch or initial_epoch
    done_before = worker_saving.resumed_steps(user_callbacks, initial_epoch)  # a mid-epoch backup's steps
    if model._initial_epoch or done_before:
        finished += done_before
        model.optimizer.iterations.assign(finished)
    training_logs = None
    for epoch in range(initial_epoch, epochs):
        if not _uses_default_train_step(model):
            model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        sums = _StateSum(model)
        results, begin = [], 0
        try:
            epoch_steps = steps_per_epoch - (done_before if epoch == initial_epoch else 0)
            while begin < epoch_steps and not model.stop_training:
                steps = min(per_execution, epoch_steps - begin)
                callbacks.on_train_batch_begin(begin)
                results.append(coordinator.schedule(function_for(steps), args=(iterator,)))
                begin += steps
                callbacks.on_train_batch_end(begin - 1, {})
            coordinator.join()
            for result in results:
                sums.add(result.fetch())
        except tf.errors.OpError as err:
            if not ps_variables.is_ps_failure(err):
                raise
            raise ps_variables.lost_ps_error(err, strategy, epoch, finished, _resume_hint(user_callbacks)) from err
        finished += begin
        model.optimizer.iterations.assign(finished)  # exact: no step is in flight now
        logs = sums.results() if _uses_default_train_step(model) else _stateful_logs(model)
        if validation_data is not None:
            val_logs = evaluate(model, validation_data, steps=validation_steps, callbacks=callbacks,
                                return_dict=True, verbose=0)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callbacks.on_epoch_end(epoch, logs)
        training_logs = logs
        if model.stop_training:
            break
    callbacks.on_train_end(logs=training_logs)
    return model.history


def _stateful_logs(model):
    from keras.src.utils.python_utils import pythonify_logs

    return pythonify_logs(model.get_metrics_result())


def evaluate(model, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
             callbacks=None, return_dict=False, **kwargs):
    """``model.evaluate`` under ``ParameterServerStrategy``: once over the data, on the coordinator."""
    import keras
    import tensorflow as tf

    kwargs.pop("_use_cached_eval_dataset", None)
    if kwargs:
        raise ValueError(f"Arguments not recognized: {kwargs}")
    model._assert_compile_called("evaluate")
    _check_input(x, "evaluate")
    given = [n for n, v in (("y", y), ("sample_weight", sample_weight), ("batch_size", batch_size)) if v is not None]
    if given:
        raise ValueError(f"Under ParameterServerStrategy, evaluate takes its batches from the dataset; "
                         f"{', '.join(given)} cannot be given.")
    dataset = _local_dataset(x)
    if steps is not None:
        dataset = dataset.take(steps)
    elif dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError("Under ParameterServerStrategy, evaluate on an infinite dataset needs steps.")
    _build(model, dataset)
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            callbacks, add_progbar=verbose != 0, verbose=2 if verbose == "auto" else verbose, epochs=1,
            steps=steps, model=model)
    test = _cached(model, "test", lambda: _test_function(model))
    metrics = pieces.tracked_metrics(model)
    states = [m.stateless_reset_state() for m in metrics]
    custom = type(model).test_step is not _trainer_class().test_step
    if custom:
        model.reset_metrics()
    model.stop_evaluating = False
    callbacks.on_test_begin()
    for step, data in enumerate(dataset):
        callbacks.on_test_batch_begin(step)
        states = test(data, states)
        callbacks.on_test_batch_end(step, {})
        if model.stop_evaluating:
            break
    sums = _StateSum(model)
    sums.add([[keras.ops.convert_to_numpy(v) - i for v, i in zip(s, si)] for s, si in zip(states, sums.initial)])
    logs = _stateful_logs(model) if custom else sums.results()
    callbacks.on_test_end(logs)
    return logs if return_dict else model._flatten_metrics_in_order(logs)


def timed_epochs():
    """A callback recording each epoch's seconds (``.seconds``), for throughput summaries."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._started)

    return EpochTimer()
