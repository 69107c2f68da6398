"""The pieces every tfpar step is built from: batches, Keras's forward and backward, and state.

Keras 3.15's ``train_step`` split where tfpar needs to step in: the batch
(``unpack``, ``split`` into micro-batches, ``batch_size``), the forward and
backward pass (``forward_backward``, stateless, for the builder's steps and
XLA; ``gradients``, stateful, for parameter-server and DTensor steps, through
partitioned weights too), and the state layers update in ``call``
(``stateless``, ``state_of``, ``assign``) and metrics keep
(``tracked_metrics``, ``update_states``). ``tfpar.step.builder`` puts them
together from a model's plan; the pipeline and the parameter-server and
DTensor functions call them directly.

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
"""

import tensorflow as tf

from tfpar.core import internals


def unpack(data):
    """``(x, y, sample_weight)`` from a batch, as Keras's own steps unpack it."""
    return internals.get("unpack_x_y_sample_weight")(data)


def call(model, x, training):
    return model(x, training=training) if model._call_has_training_arg else model(x)


def batch_size(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def split(batch, count):
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


def add(a, b):
    """``a + b`` for gradients, where ``None`` means zero."""
    if a is None or b is None:
        return a if b is None else b
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


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


def gradients(model, x, y, sample_weight, partitioned=False):
    """Keras 3.15's forward and backward pass, stateful: ``(loss, y_pred, grads)``.

    Layers assign their own state as in Keras's ``train_step``. With
    ``partitioned`` the gradients reach weights partitioned over several
    parameter servers (``ShardedVariable``): ``tape.gradient`` on such a Keras
    weight asks for ``value.handle``, which it lacks, so the gradient is taken
    for each shard and the shards' gradients concatenated (variables are
    partitioned along axis 0).
    """
    with tf.GradientTape() as tape:
        y_pred = call(model, x, training=True)
        loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        scaled = model.optimizer.scale_loss(loss) if model.optimizer is not None else loss
    weights = model.trainable_weights
    if not partitioned:
        return loss, y_pred, tape.gradient(scaled, weights)
    pieces = [shards(w) for w in weights]
    flat = tape.gradient(scaled, [v for parts in pieces for v in parts])
    grads, at = [], 0
    for parts in pieces:
        part = flat[at:at + len(parts)]
        at += len(parts)
        if len(part) == 1:
            grads.append(part[0])
        elif any(g is None for g in part):
            grads.append(None)
        else:
            grads.append(tf.concat([tf.convert_to_tensor(g) for g in part], axis=0))
    return loss, y_pred, grads


def shards(weight):
    """The ``tf.Variable`` pieces of a Keras weight: its shards when partitioned over parameter servers."""
    value = getattr(weight, "value", weight)
    if isinstance(value, internals.get("sharded_variable")):
        return list(value.variables)
    return [value]


def tracked_metrics(model):
    """The metrics a step updates: the loss tracker and the compiled metrics."""
    return [m for m in (model._loss_tracker, model._compile_metrics) if m is not None]


def update_states(model, states, x, y, y_pred, sample_weight, loss):
    """``tracked_metrics``' new states after one batch, from ``states`` (nothing assigned), as Keras updates them."""
    new = []
    for metric, state in zip(tracked_metrics(model), states):
        if metric is model._loss_tracker:
            new.append(metric.stateless_update_state(
                state, internals.get("unscale_loss_for_distribution")(loss), sample_weight=batch_size(x)))
        else:
            new.append(metric.stateless_update_state(state, y, y_pred, sample_weight=sample_weight))
    return new
