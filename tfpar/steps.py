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
micro-batch with its own statistics and updates its moving statistics once
per micro-batch, as with a batch of that size.

The loop is unrolled in Python, not a ``tf.while_loop``. Under multi-worker
training BatchNormalization's moving statistics all-reduce when assigned
(tfpar.compat), and an all-reduce cannot run inside TF control flow either.

``tfpar.xla`` builds its compiled step from the same pieces: there, only
``forward_backward`` runs under XLA, once per micro-batch.
"""

import tensorflow as tf


def unpack(data):
    """``(x, y, sample_weight)`` from a batch, as Keras's own steps unpack it."""
    from keras.src.trainers.data_adapters import data_adapter_utils

    return data_adapter_utils.unpack_x_y_sample_weight(data)


def call(model, x, training):
    return model(x, training=training) if model._call_has_training_arg else model(x)


def batch_size(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def micro_batches(model):
    """How many micro-batches each train step of ``model`` splits its batch into (1: no accumulation)."""
    return getattr(model, "_tfpar_micro_batches", 1)


def forward_backward(model):
    """Keras 3.15's tape part of ``train_step``: ``fn(x, y, sample_weight) -> (loss, y_pred, grads)``."""

    def forward_backward(x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = call(model, x, training=True)
            loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = model.optimizer.scale_loss(loss) if model.optimizer is not None else loss
        return loss, y_pred, tape.gradient(scaled, model.trainable_weights)

    return forward_backward


def train_step(model, step_fn):
    """Keras 3.15's ``train_step`` with ``step_fn`` (a ``forward_backward``) run once per micro-batch.

    The summed gradients are divided by the number of micro-batches, so the
    update is the one for the mean loss over the whole batch.
    """
    from keras.src.losses import loss as loss_module

    def train_step(data):
        x, y, sample_weight = unpack(data)
        if not model.trainable_weights:
            return type(model).train_step(model, data)
        count = micro_batches(model)
        losses, predictions, summed = [], [], None
        for part in _split((x, y, sample_weight), count):
            loss, y_pred, grads = step_fn(*part)
            losses.append(loss)
            predictions.append(y_pred)
            summed = grads if summed is None else [_add(a, b) for a, b in zip(summed, grads)]
        if count > 1:
            summed = [None if g is None else tf.convert_to_tensor(g) / count for g in summed]
        loss = losses[0] if count == 1 else tf.add_n(losses) / count
        y_pred = predictions[0] if count == 1 else tf.nest.map_structure(lambda *p: tf.concat(p, 0), *predictions)
        model._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss), sample_weight=batch_size(x))
        model.optimizer.apply_gradients(zip(summed, model.trainable_weights))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    train_step.tfpar_micro_batch_step = True
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
    installed = model.__dict__.get("train_step")
    if micro_batches > 1 and installed is None:
        model.train_step = train_step(model, forward_backward(model))
    elif micro_batches == 1 and getattr(installed, "tfpar_micro_batch_step", False) and not _xla_owns(model):
        del model.train_step
    model.train_function = None


def _xla_owns(model):
    return getattr(model, "_tfpar_xla", {}).get("train") in ("xla", "fallback")


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
