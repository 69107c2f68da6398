"""The one step builder: a model's train, test and predict steps, made from its ``StepPlan``.

``install(model)`` reads the plan (``tfpar.step.plan``) and gives the model
the steps it describes, or Keras's own where the plan asks for nothing (so a
model no feature touched trains with Keras's step, at Keras's speed). The
train step is Keras 3.15's, split where the features step in:

1. with worker timing, a clock stamp when the replica's batch is there, and
   with balanced shares, the replica's slice of the global batch;
2. the forward and backward pass of each micro-batch in turn (XLA-compiled
   when the plan says so), gradients summed, the layers' state assigned once;
3. the gradients summed over replicas in buckets (when the plan has them)
   and applied in one ``apply_gradients``: one update per step;
4. the loss tracker and the compiled metrics, as Keras updates them.

Why each part: gradient accumulation divides the all-reduce's cost by the
number of micro-batches (Keras 3.15's own ``gradient_accumulation_steps``
all-reduces inside a ``cond``, which fails under a strategy); buckets let
each all-reduce overlap the backward pass (``tfpar.step.all_reduce``); XLA is
compiled per replica because Keras's own fails under strategies
(``tfpar.step.xla``); timing and shares: ``tfpar.step.stragglers``. The
loop over micro-batches is unrolled in Python, not a ``tf.while_loop``: an
all-reduce cannot run inside TF control flow.

The parameter-server and DTensor training functions take their steps from
here too (``delta_step``, ``gradient_step``), and the pipeline's
``PipelineModel`` uses ``tfpar.step.pieces``.
"""

import tensorflow as tf

from tfpar.core import internals
from tfpar.step import jit, pieces, reduce
from tfpar.step import plan as plans
from tfpar.step import timing as timing_lib

KINDS = ("train", "test", "predict")


def defines_own(model, kind):
    """Whether ``model``'s class defines its own ``kind`` step, which tfpar never replaces."""
    name = f"{kind}_step"
    return getattr(type(model), name) is not getattr(internals.get("trainer_class"), name)


def install(model):
    """(Re)build ``model``'s steps from its plan: tfpar's where the plan needs them, Keras's own elsewhere.

    Steps the model's class defines stay. Call again whenever the plan changes
    (every feature's installer does); Keras makes its functions anew.
    """
    plan = plans.of(model)
    for kind in plan.installed:
        vars(model).pop(f"{kind}_step", None)
    plan.installed = {kind for kind in KINDS if plan.needs(kind) and not defines_own(model, kind)}
    warned = set()  # one XLA warning per cause, for all three steps
    if "train" in plan.installed:
        model.train_step = _train_step(model, plan, warned)
    if "test" in plan.installed:
        model.test_step = _test_step(model, plan, warned)
    if "predict" in plan.installed:
        model.predict_step = _predict_step(model, plan, warned)
    model.train_function = model.test_function = model.predict_function = None


def _compiled(model, plan, kind, pure, warned):
    if plan.xla.get(kind) in ("xla", "fallback"):
        return jit.compiled_or_fallback(model, kind, pure, plan.xla, warned)
    return pure


def _train_step(model, plan, warned):
    """Keras 3.15's ``train_step`` with the plan's micro-batches, XLA, buckets, timing and shares.

    The summed gradients of the micro-batches are divided by their number, so
    the update is the one for the mean loss over the whole batch.
    """
    count, timing = plan.micro_batches, plan.timing
    forward_backward = _compiled(model, plan, "train", pieces.forward_backward(model), warned)
    unscale = internals.get("unscale_loss_for_distribution")

    def train_step(data):
        if not model.trainable_weights:
            return type(model).train_step(model, data)
        clock = replica = None
        if timing is not None:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            clock = timing.clock.handle  # this replica's copy
            with tf.control_dependencies([t for t in tf.nest.flatten(data) if t is not None]):
                arrived = timing_lib.stamp(clock)
        x, y, sample_weight = pieces.unpack(data)
        if timing is not None and timing.balance:
            x, y, sample_weight = timing_lib.slice_of(timing, replica, (x, y, sample_weight))
        state, updated = pieces.state_of(model), {}
        losses, predictions, grads = [], [], None
        for part in pieces.split((x, y, sample_weight), count):
            (loss, y_pred, part_grads), updates = forward_backward(state, *part)
            state.update(updates)
            updated.update(updates)
            losses.append(loss)
            predictions.append(y_pred)
            grads = part_grads if grads is None else [pieces.add(a, b) for a, b in zip(grads, part_grads)]
        if count > 1:
            grads = [None if g is None else tf.convert_to_tensor(g) / count for g in grads]
        examples = pieces.batch_size(x)
        if timing is not None:
            grads, updated = _timed(model, timing, replica, clock, examples, grads, updated)
        pieces.assign(model, updated)  # once per step, before the gradients' all-reduces (it needs only the forward)
        loss = losses[0] if count == 1 else tf.add_n(losses) / count
        y_pred = predictions[0] if count == 1 else tf.nest.map_structure(lambda *p: tf.concat(p, 0), *predictions)
        model._loss_tracker.update_state(unscale(loss), sample_weight=examples)
        stamps = apply(model, grads, clock)
        if timing is not None:
            ready, done = stamps
            row = tf.cast(tf.stack([(arrived - timing.host_begin.read_value()) * 1000.0, (ready - arrived) * 1000.0,
                                    (done - ready) * 1000.0, tf.cast(examples, tf.float64)]), tf.float32)
            timing.times.assign(tf.distribute.get_replica_context().all_gather(row[None], axis=0))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step


def _timed(model, timing, replica, clock, examples, grads, updates):
    """The replica's gradients scaled to the global batch (balanced), the test-only slowdown, and static shapes.

    Balanced: Keras's mean over the replica's slice, divided by the replicas,
    becomes the sum over the slice divided by the global batch; the summed
    gradients are then those of one global batch whatever the shares.
    Slicing loses static shapes, which collectives need to pack; they are set back.
    """
    examples = tf.cast(examples, tf.float32)
    if timing.balance:
        factor = examples * (timing.replicas / timing.global_batch)
        grads = [timing_lib.scaled(g, factor) for g in grads]
    if timing.slow is not None:  # test-only seam: this replica sleeps per example before its gradients are ready
        chosen = tf.logical_or(tf.equal(replica, timing.slow[0]), timing.slow[0] < 0)
        ms = tf.where(chosen, examples * timing.slow[1], 0.0)
        with tf.control_dependencies([g for g in grads if g is not None]):
            slept = timing_lib.nap(clock, ms)
        grads = [None if g is None else g + tf.cast(slept, g.dtype) * 0 for g in grads]
    variables = model.variables
    updates = {k: tf.ensure_shape(v, variables[int(k)].shape) for k, v in updates.items()}
    grads = [g if g is None or isinstance(g, tf.IndexedSlices) else tf.ensure_shape(g, w.shape)
             for g, w in zip(grads, model.trainable_weights)]
    return grads, updates


def apply(model, grads, clock=None):
    """``apply_gradients`` of one replica's ``grads``; with the plan's buckets they are summed here first.

    Summing before ``apply_gradients`` lets each bucket's all-reduce start as
    soon as its gradients exist even under a LossScaleOptimizer, whose finite
    check would otherwise hold every all-reduce until the last gradient (and
    then the workers check the same summed gradients). An optimizer that clips
    gradients keeps Keras's order (clip each replica's, then sum, in buckets).

    With ``clock`` (a replica's timing clock) returns two stamps: the replica's
    own gradients ready, and the summed ones there (with Keras's own
    all-reduce inside ``apply_gradients``, after the update).
    """
    optimizer, weights = model.optimizer, model.trainable_weights
    bucketed = plans.of(model).bucketed() and not reduce.clips(optimizer)
    summed = None
    if bucketed:
        reduction = reduce.of(optimizer)
        summed = reduce.sum_in_buckets(list(grads), reduction.bucket_bytes, reduction.dtype)
    ready = done = None
    if clock is not None:
        with tf.control_dependencies([g for g in grads if g is not None]):
            ready = timing_lib.stamp(clock)
    if bucketed:
        if clock is not None:
            with tf.control_dependencies([g for g in summed if g is not None]):
                done = timing_lib.stamp(clock)
        with reduce.summed_already(optimizer):
            optimizer.apply_gradients(zip(summed, weights))
    else:
        optimizer.apply_gradients(zip(grads, weights))
        if clock is not None:  # Keras's own all-reduce inside apply_gradients: the update counts as waiting too
            with tf.control_dependencies([tf.convert_to_tensor(optimizer.iterations)]):
                done = timing_lib.stamp(clock)
    return (ready, done) if clock is not None else None


def _assigning(model, step_fn):
    """``step_fn(state, *args)`` as a plain ``fn(*args)`` that assigns its updates (test and predict steps)."""

    def run(*args):
        result, updates = step_fn(pieces.state_of(model), *args)
        pieces.assign(model, updates)
        return result

    return run


def _test_step(model, plan, warned):
    """Keras 3.15's ``test_step``, its forward pass XLA-compiled per replica."""
    unscale = internals.get("unscale_loss_for_distribution")

    def forward(x, y, sample_weight):
        y_pred = pieces.call(model, x, training=False)
        loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        return loss, y_pred

    step_fn = _assigning(model, _compiled(model, plan, "test", pieces.stateless(model, forward), warned))

    def test_step(data):
        x, y, sample_weight = pieces.unpack(data)
        loss, y_pred = step_fn(x, y, sample_weight)
        model._loss_tracker.update_state(unscale(loss), sample_weight=pieces.batch_size(x))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return test_step


def _predict_step(model, plan, warned):
    """Keras 3.15's ``predict_step``, XLA-compiled per replica."""
    predict = pieces.stateless(model, lambda x: pieces.call(model, x, training=False))
    step_fn = _assigning(model, _compiled(model, plan, "predict", predict, warned))

    def predict_step(data):
        x, _, _ = pieces.unpack(data)
        return step_fn(x)

    return predict_step


def delta_step(model):
    """One replica's train step that returns how it changed the metrics' states instead of assigning them.

    For parameter-server training (``tfpar.kerasfix.ps_fit``): workers update
    concurrently, and Keras metrics' read-then-assign would lose updates, so
    each step starts ``pieces.tracked_metrics`` from their reset state and
    returns the change for the coordinator to add up. The plan's
    ``partitioned`` takes gradients through weights split over several
    parameter servers; its ``staleness`` counters ``(updates, staleness sum)``
    count each update and how many others were applied since its step read
    the weights (``assign_add`` is atomic where ``optimizer.iterations`` loses
    increments).
    """
    plan = plans.of(model)

    def step(data):
        initial = [m.stateless_reset_state() for m in pieces.tracked_metrics(model)]
        x, y, sample_weight = pieces.unpack(data)
        counters = plan.staleness
        seen = counters[0].read_value() if counters else None  # updates applied before this step reads the weights
        with tf.control_dependencies([seen] if counters else []):
            loss, y_pred, grads = pieces.gradients(model, x, y, sample_weight, partitioned=plan.partitioned)
        if counters:
            updates, stale = counters
            with tf.control_dependencies([g for g in grads if g is not None]):  # counted as its update is applied
                stale.assign_add(updates.assign_add(1, read_value=True) - 1 - seen)
        model.optimizer.apply_gradients(zip(grads, model.trainable_weights))
        new = pieces.update_states(model, initial, x, y, y_pred, sample_weight, loss)
        return [[n - i for n, i in zip(ns, si)] for ns, si in zip(new, initial)]

    return step


def gradient_step(model):
    """Keras's train step up to the update: loss and metrics updated, the gradients returned.

    For DTensor (``tfpar.parallel.sharding.keras_steps``), which applies them
    in a function of its own. The plan's ``relayout`` puts each gradient in
    its weight's layout (a replicated bias after a column-split kernel comes
    out split; the update needs the weight's).
    """
    plan = plans.of(model)
    unscale = internals.get("unscale_loss_for_distribution")

    def step(data):
        x, y, sample_weight = pieces.unpack(data)
        loss, y_pred, grads = pieces.gradients(model, x, y, sample_weight)
        model._loss_tracker.update_state(unscale(loss), sample_weight=pieces.batch_size(x))
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return plan.relayout(grads) if plan.relayout is not None else grads

    return step
