"""One train step of a pipeline: the schedule's tasks built into the step's graph, stage by stage.

Each forward task runs its stage on one micro-batch under the stage's
device and keeps its ``GradientTape``. Each backward task asks that tape for
the gradients of the stage's output, seeded with the gradient that came back
from the next stage (``output_gradients``), again under the stage's device:
``GradientTape.gradient`` otherwise places the whole backward where it is
called (tensorflow/tensorflow#33688). A stage's tasks are chained with
control dependencies in the schedule's order (per device, where the
interleaved schedule puts several stages on one), so the order, and with it
the number of micro-batches whose activations a device holds, is the
schedule's, not whatever the executor picks. What crosses a cut is a tuple
of tensors (``partition``): the activation and whatever later stages read (a
padding mask, positions); gradients flow back through its floating tensors only.

The loss of micro-batch m is scaled by 1 / (M x copies) and by the
optimizer's loss scale (``LossScaleOptimizer`` under ``mixed_float16``), so
the summed gradients are those of the whole batch's mean loss, as Keras's
own ``train_step`` computes them. Weight regularisation is added once per
micro-batch at 1 / (M x copies) in the stage that holds the weight.
"""

import tensorflow as tf

from tfpar.parallel.pipeline import schedules
from tfpar.step import pieces


class Trace:
    """What a built step did, for tests and reports: the tasks in build order per (copy, stage) and per
    (copy, device index)."""

    def __init__(self):
        self.tasks, self.device_tasks = {}, {}

    def record(self, copy, stage, task, device=None):
        self.tasks.setdefault((copy, stage), []).append(task)
        self.device_tasks.setdefault((copy, stage if device is None else device), []).append(task)

    def held(self):
        """Per (copy, stage): the most micro-batches whose activations were held at once."""
        return {key: schedules.in_flight([order])[0] for key, order in self.tasks.items()}

    def held_per_device(self):
        """Per (copy, device index): the most stage activations its stages held at once."""
        return {key: schedules.in_flight([order])[0] for key, order in self.device_tasks.items()}


def _regularization(stage_model):
    losses = stage_model.losses
    return tf.add_n([tf.cast(l, tf.float32) for l in losses]) if losses else None


def _floats(tensors):
    """The floating tensors of a cut's tuple: the ones a gradient flows back through."""
    return [t for t in tensors if t.dtype.is_floating]


def _dense(grad):
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def run(model, plan, parts, trace=None):
    """Build one step's forward and backward over ``parts`` (micro-batch m of copy r at ``m * copies + r``).

    Returns ``(grads_and_vars, loss, y_pred)``: gradients summed over
    micro-batches and copies (on each stage's own device), the batch's mean
    loss including regularisation, and the predictions in batch order.
    """
    S, M, D = len(plan.stages), plan.micro_batches, plan.replicas
    scale = (lambda v: model.optimizer.scale_loss(v)) if model.optimizer is not None else (lambda v: v)
    share = 1.0 / (M * D)
    tapes, activations, upstream, last_ops = {}, {}, {}, {}
    summed = {}  # (copy, stage) -> list of per-weight gradient sums
    data_losses, reg_values, predictions = [], {}, {}
    per_copy = plan.devices_per_copy or S  # interleaved: V stages per device; each device runs one task at a time
    for tick in schedules.ticks(schedules.orders(plan.schedule, S, M, per_copy)):
        for kind, s, m in tick:
            for r in range(D):
                device, stage = plan.devices[r * S + s], plan.stages[s]
                lane = (r, schedules.device_of(s, per_copy))
                deps = last_ops.get(lane, [])
                prefix = f"copy{r}_" if D > 1 else ""  # op names say stage, task and micro-batch (timelines)
                if trace is not None:
                    trace.record(r, s, (kind, s, m), lane[1])
                x, y, sw = parts[m * D + r]
                if kind == "F":
                    inputs = x if s == 0 else activations.pop((r, s - 1, m))
                    with tf.device(device), tf.name_scope(f"{prefix}stage{s}_F{m}"), tf.control_dependencies(deps):
                        tape = tf.GradientTape()
                        with tape:
                            if s > 0:
                                tape.watch(_floats(inputs))
                            out = stage(inputs, training=True)
                            reg = _regularization(stage)
                            objective = None if reg is None else reg * share
                            if reg is not None and r == 0 and m == 0:
                                reg_values[s] = reg
                            if s == S - 1:
                                loss = model._compile_loss(y, out, sw)
                                data_losses.append(loss)
                                predictions[m * D + r] = out
                                objective = loss * share if objective is None else objective + loss * share
                            if objective is not None:
                                objective = scale(objective)
                    tapes[(r, s, m)] = (tape, inputs, out, objective)
                    if s < S - 1:
                        activations[(r, s, m)] = out
                    last_ops[lane] = tf.nest.flatten(out)
                else:
                    tape, inputs, out, objective = tapes.pop((r, s, m))
                    weights = plan.weights[s]
                    floats = _floats(inputs) if s > 0 else []
                    sources = floats + weights
                    with tf.device(device), tf.name_scope(f"{prefix}stage{s}_B{m}"), tf.control_dependencies(deps):
                        if s == S - 1:
                            grads = tape.gradient(objective, sources)
                        else:  # a cut carries a tuple; tensors with no gradient (a mask, ids) seed nothing
                            pairs = [(t, g) for t, g in zip(out, upstream.pop((r, s, m))) if g is not None]
                            targets, seeds = [t for t, _ in pairs], [g for _, g in pairs]
                            if objective is not None:
                                targets.append(objective)
                                seeds.append(tf.ones_like(objective))
                            grads = tape.gradient(targets, sources, output_gradients=seeds) if targets else \
                                [None] * len(sources)
                        last_ops[lane] = [tf.group(*[_dense(g) for g in grads if g is not None] or
                                                     tf.nest.flatten(out))]
                        if s > 0:
                            found = iter(grads[:len(floats)])
                            upstream[(r, s - 1, m)] = [next(found) if t.dtype.is_floating else None for t in inputs]
                            grads = grads[len(floats):]
                        previous = summed.get((r, s))
                        summed[(r, s)] = grads if previous is None else [
                            pieces.add(a, b) for a, b in zip(previous, grads)]
    grads_and_vars = []
    for s in range(S):
        with tf.device(plan.devices[s]), tf.name_scope(f"stage{s}_all_reduce"):
            for i, weight in enumerate(plan.weights[s]):
                parts_of = [summed[(r, s)][i] for r in range(D) if summed[(r, s)][i] is not None]
                grad = None if not parts_of else (parts_of[0] if D == 1 else tf.add_n(
                    [tf.convert_to_tensor(g) for g in parts_of]))
                grads_and_vars.append((grad, weight))
    with tf.device(plan.devices[S - 1]):
        loss = tf.add_n([tf.cast(l, tf.float32) for l in data_losses]) * share
        for reg in reg_values.values():
            loss = loss + reg
        y_pred = tf.nest.map_structure(lambda *p: tf.concat(p, 0), *[predictions[k] for k in range(M * D)])
    return grads_and_vars, loss, y_pred

