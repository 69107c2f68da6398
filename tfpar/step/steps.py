"""Keras 3's train step split at the gradient, with gradient accumulation that works under strategies.

Why accumulate: under ``MultiWorkerMirroredStrategy`` the gradient all-reduce
costs the same each step whatever the batch. For two one-core workers
training ResNet-50 it was a quarter of every step (benchmarks/README.md).
Summing the gradients of k micro-batches before one all-reduce divides that
cost by k, while memory stays that of one micro-batch.

Keras 3.15's own ``gradient_accumulation_steps`` cannot be used under a
strategy: it all-reduces inside a ``cond`` ("merge_call called while defining
a new graph"). tfpar's keeps no gradients between steps. Each ``fit`` step
gets k micro-batches per replica (the dataset's batch is k times the
micro-batch; ``tfpar.data.make(micro_batches=k)``). The step runs forward and
backward on each micro-batch in turn and sums the gradients. It then makes
one ``apply_gradients`` call: one all-reduce, one optimizer update. So a step
is an update, ``optimizer.iterations`` counts updates, and
``steps_per_execution`` works unchanged. BatchNormalization normalises each
micro-batch with its own statistics, and its moving statistics follow every
micro-batch in order, as with batches of that size.

State that layers update in ``call`` (BatchNormalization's moving
statistics, dropout seeds) is not assigned per micro-batch. Each micro-batch
runs ``stateless``: it reads the values the previous one left and returns
its own, and the step assigns the last values once. Under multi-worker
training every such assignment is an all-reduce (tfpar.compat averages BN
statistics), and ResNet-50 has 106 of them: 4 x 106 small all-reduces per
step with 4 micro-batches, 106 this way (traced on two one-core workers:
about 390 ms of all-reduce time per step before, about 220 ms after). The
result is the same: a moving average is linear in the batch statistics, and
every worker starts the step from the same values.

The loop is unrolled in Python, not a ``tf.while_loop``: an all-reduce
cannot run inside TF control flow. ``tfpar.xla`` builds its compiled step
from the same pieces; there, the ``stateless`` forward and backward pass of
one micro-batch is what XLA compiles.
"""

import tensorflow as tf


def unpack(data):
    """``(x, y, sample_weight)`` from a batch, as Keras's own steps unpack it."""
    from tfpar.core import internals

    return internals.get("unpack_x_y_sample_weight")(data)


def call(model, x, training):
    return model(x, training=training) if model._call_has_training_arg else model(x)


def batch_size(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def micro_batches(model):
    """How many micro-batches each train step of ``model`` splits its batch into (1: no accumulation)."""
    return getattr(model, "_tfpar_micro_batches", 1)


def forward_backward(model):
    """Keras 3.15's tape part of ``train_step``, ``stateless``: ``pure(state, x, y, sample_weight)``.

    Returns ``((loss, y_pred, grads), updates)``. The trainable weights are
    read inside the tape and handed to the scope, so gradients reach them and
    weight regularizers (which Keras reads through the scope) see them.
    """
    from keras import StatelessScope

    def pure(state, x, y, sample_weight):
        weights = model.trainable_weights
        with tf.GradientTape() as tape:
            with StatelessScope(state_mapping=_mapping(model, state), collect_losses=True) as scope:
                y_pred = call(model, x, training=True)
                loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
                scaled = model.optimizer.scale_loss(loss) if model.optimizer is not None else loss
        return (loss, y_pred, tape.gradient(scaled, weights)), _updates(model, scope, state)

    return pure


def stateless(model, fn):
    """``fn`` with the variable updates it makes returned, not assigned.

    Returns ``pure(state, *args) -> (fn's result, updates)``. ``state`` and
    ``updates`` map a variable's index in ``model.variables`` (a string) to a
    value: ``fn`` reads ``state``'s values (and the current trainable
    weights), and ``updates`` holds only the values it assigned, as Keras's
    JAX trainer does with ``keras.StatelessScope``.
    """
    from keras import StatelessScope

    def pure(state, *args):
        with StatelessScope(state_mapping=_mapping(model, state), collect_losses=True) as scope:
            result = fn(*args)
        return result, _updates(model, scope, state)

    return pure


def _mapping(model, state):
    """Every trainable weight's current value, then ``state``'s values: what the scope reads."""
    variables = model.variables
    mapping = {id(w): (w, tf.convert_to_tensor(w)) for w in model.trainable_weights}
    for i, value in state.items():
        mapping[id(variables[int(i)])] = (variables[int(i)], value)
    return list(mapping.values())


def _updates(model, scope, state):
    """The values the scope's variables were assigned (a value handed back unchanged was not assigned)."""
    updates = {}
    for i, variable in enumerate(model.variables):
        value = scope.get_current_value(variable)
        if value is not None and not variable.trainable and value is not state.get(str(i)):
            updates[str(i)] = value
    return updates


def state_of(model):
    """The current values of ``model``'s non-trainable variables, keyed as ``stateless`` keys them."""
    return {str(i): tf.convert_to_tensor(v) for i, v in enumerate(model.variables) if not v.trainable}


def assign(model, updates):
    """Assign ``stateless``'s ``updates`` to ``model``'s variables, as the layers would have.

    Under a strategy, variables with ``aggregation="mean"`` (BatchNormalization's
    moving statistics in multi-worker runs, tfpar.compat) would each make their
    own all-reduce on assignment: 106 collectives a step for ResNet-50. Here
    they are averaged in one ``all_reduce`` call (one packed collective) and
    each replica's copy is then set to the average, the value each
    assignment would have given.
    """
    variables = model.variables
    context = tf.distribute.get_replica_context()
    means = []
    if context is not None and context.num_replicas_in_sync > 1:
        means = [i for i in updates if variables[int(i)].aggregation == "mean"]
    if len(means) > 1:
        averaged = context.all_reduce(tf.distribute.ReduceOp.MEAN, [updates[i] for i in means])
        context.merge_call(_set_every_copy, args=([variables[int(i)].value for i in means], averaged))
    for i, value in updates.items():
        if len(means) < 2 or i not in means:
            variables[int(i)].assign(value)


def _set_every_copy(strategy, variables, values):
    """Cross-replica: give each replica's copy of ``variables`` its own (already averaged) value."""
    for variable, value in zip(variables, values):
        strategy.extended.update(variable, lambda copy, v: copy.assign(v), args=(value,), group=False)


def own_step_needed(model):
    """Whether ``model`` trains with tfpar's step: micro-batches, or gradients all-reduced in buckets."""
    return micro_batches(model) > 1 or getattr(model, "_tfpar_bucketed", False)


def _clips(optimizer):
    target = getattr(optimizer, "inner_optimizer", optimizer)
    return any(getattr(target, name, None) for name in ("clipnorm", "clipvalue", "global_clipnorm"))


def _apply(model, grads):
    """``apply_gradients``; with buckets, the gradients are summed here first.

    Summing before ``apply_gradients`` lets each bucket's all-reduce start as
    soon as its gradients exist even under a LossScaleOptimizer, whose finite
    check would otherwise hold every all-reduce until the last gradient (and
    then the workers check the same summed gradients). An optimizer that clips
    gradients keeps Keras's order (clip each replica's, then sum, in buckets).
    """
    from tfpar.step import all_reduce

    optimizer = model.optimizer
    if all_reduce.bucket_bytes(optimizer) is None or _clips(optimizer):
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return
    grads = all_reduce.sum_before_apply(optimizer, grads)
    with all_reduce.summed_already(optimizer):
        optimizer.apply_gradients(zip(grads, model.trainable_weights))


def train_step(model, step_fn):
    """Keras 3.15's ``train_step`` with ``step_fn`` run once per micro-batch.

    ``step_fn(state, x, y, sample_weight) -> ((loss, y_pred, grads), updates)``
    is ``forward_backward`` (XLA-compiled or not). The summed
    gradients are divided by the number of micro-batches, so the update is the
    one for the mean loss over the whole batch.
    """
    from keras.src.losses import loss as loss_module

    def train_step(data):
        x, y, sample_weight = unpack(data)
        if not model.trainable_weights:
            return type(model).train_step(model, data)
        count = micro_batches(model)
        state, updated = state_of(model), {}
        losses, predictions, summed = [], [], None
        for part in _split((x, y, sample_weight), count):
            (loss, y_pred, grads), updates = step_fn(state, *part)
            state.update(updates)
            updated.update(updates)
            losses.append(loss)
            predictions.append(y_pred)
            summed = grads if summed is None else [_add(a, b) for a, b in zip(summed, grads)]
        assign(model, updated)  # once per step, whatever the number of micro-batches; before the gradients'
        if count > 1:  # all-reduces, as its collective needs only the forward pass
            summed = [None if g is None else tf.convert_to_tensor(g) / count for g in summed]
        loss = losses[0] if count == 1 else tf.add_n(losses) / count
        y_pred = predictions[0] if count == 1 else tf.nest.map_structure(lambda *p: tf.concat(p, 0), *predictions)
        model._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss), sample_weight=batch_size(x))
        _apply(model, summed)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step


def accumulate(model, micro_batches):
    """Make every train step of ``model`` sum gradients over ``micro_batches`` before one update.

    Call after ``model.compile`` and after ``tfpar.xla.enable`` (whose
    compiled step also honours it). Each per-replica batch must divide evenly
    into ``micro_batches``; batch the data at ``micro_batches`` times the
    micro-batch. ``micro_batches=1`` undoes it.

    Raises:
      ValueError: ``micro_batches`` is not a positive integer, the model is not
        compiled, or its class defines its own ``train_step``.
    """
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}.")
    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.steps.accumulate needs a compiled model; call model.compile(...) first.")
    if micro_batches > 1 and type(model).train_step is not TensorFlowTrainer.train_step:
        raise ValueError(f"Model {model.name!r} defines its own train_step, which tfpar cannot split into "
                         f"micro-batches; use grad_accum_steps=1.")
    model._tfpar_micro_batches = micro_batches
    install(model)


def install(model):
    """Give ``model`` tfpar's train step when ``own_step_needed``, Keras's own again when not."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    installed = model.__dict__.get("train_step")
    if type(model).train_step is not TensorFlowTrainer.train_step:
        return  # the model's own step stays (accumulate refused it; buckets still apply in its optimizer)
    if own_step_needed(model) and installed is None:  # tfpar.xla's step, when installed, is this step already
        model.train_step = train_step(model, forward_backward(model))
        model.train_step.tfpar_accumulating = True
    elif not own_step_needed(model) and getattr(installed, "tfpar_accumulating", False):
        del model.train_step  # Keras's own step again
    model.train_function = None


def _split(batch, count):
    """``count`` equal micro-batches of every tensor in ``batch`` (``None`` stays ``None``)."""
    if count == 1:
        return [batch]
    leaves = tf.nest.flatten(batch)
    for leaf in leaves:
        size = leaf.shape[0] if leaf is not None else None
        if size is not None and size % count:
            raise ValueError(f"A per-replica batch of {size} does not split into {count} equal micro-batches; "
                             f"make the batch a multiple of {count}.")
    pieces = [tf.split(leaf, count, axis=0) if leaf is not None else [None] * count for leaf in leaves]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(count)]


def _add(a, b):
    if a is None or b is None:
        return a if b is None else b
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)
