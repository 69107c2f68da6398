"""Stragglers: every replica's step time, collective wait and input wait, and batches balanced by speed.

In synchronous data parallelism every step waits for the slowest replica, and
from the chief's throughput alone a slow worker is invisible. Here the train
step itself times each replica with ``tf.timestamp()`` ops chained to its data
and gradients:

- input wait: from the host's call of the step (the callback stamps it) to the
  replica's batch being there (Keras fetches the batch inside the step);
- compute: forward and backward, until the replica's own gradients exist;
- collective wait: from its own gradients to the summed ones, i.e. the wait
  for the slowest peer plus the transfer.

One tiny ``all_gather`` of those few floats per step gives every worker the
whole table, so the chief reports all workers with no files: ``WorkerTimes``
writes them to TensorBoard (one run per worker under
``model_dir/workers_timing/<name>``, the same tags, so one chart compares
them) and to summary.json, and prints one warning naming a worker whose own
step time (input + compute) stays above 1.25x the median.

Balancing (``--balance_batches``): every worker reads the same global batch
stream (no sharding; ``distribute``) and each replica trains on its slice
``[start_i, start_i + share_i)`` of it, with the shares in a variable. The
slices partition the global batch, so every example of an epoch is used
exactly once whatever the shares. Each replica's gradients are scaled by
``share_i * replicas / global_batch``: Keras's mean over the local slice,
divided by the replicas, becomes the sum over the slice divided by the
global batch, and the summed gradients are those of one global batch (weight
regularisers, added once per replica scaled by 1/replicas, sum to exactly one
copy too). The global batch and the learning rate do not change. Every N
steps each worker computes new shares from the gathered compute times with
``shares_for`` (proportional to measured speed, at least a minimum, summing
to the global batch); the inputs are the same everywhere, so the shares are.
BatchNormalization normalises each slice with its own statistics, as it does
each replica's batch in plain synchronous training. With gradient
accumulation each replica's slice is split into its micro-batches, so the
shares are multiples of the number of micro-batches.

``enable`` puts the shared ``tfpar.step.timing.Timing`` into the model's step
plan; ``tfpar.step.builder`` builds the timed step with whatever else the
plan holds, in any order.
"""

import logging
import math
import os
import statistics
import time

import keras
import tensorflow as tf

from tfpar.core.devices import is_mirrored
from tfpar.step import builder, timing
from tfpar.step import plan as plans
from tfpar.step.timing import COLUMNS, SLOW_ENV  # noqa: F401  (tfpar.step.stragglers.SLOW_ENV, COLUMNS)

log = logging.getLogger("tfpar")

WARN_RATIO = 1.25  # a worker whose own step time stays above this times the median is named


# --------------------------------------------------------------------------- the share rule

def shares_for(speeds, global_batch, minimum=1, multiple=1):
    """Integer shares of ``global_batch`` proportional to ``speeds``, each >= ``minimum``, summing exactly.

    Replicas whose proportional share falls below ``minimum`` get ``minimum``
    and the rest is split among the others in proportion (repeated until no
    share is below it); the fractions are then rounded by largest remainder.
    ``multiple``: every share a multiple of it (when it divides the batch):
    tfpar's ResNet-18 aborts in TF 2.21's CPU kernels at some odd batch sizes
    (17: "double free or corruption", also on one device), so balancing uses 2.
    """
    if multiple > 1 and global_batch % multiple == 0 and global_batch // multiple >= len(speeds):
        units = shares_for(speeds, global_batch // multiple, max(1, -(-minimum // multiple)))
        return [u * multiple for u in units]
    count = len(speeds)
    if count == 0 or global_batch < count * minimum:
        raise ValueError(f"A global batch of {global_batch} cannot give {count} replicas at least {minimum} each.")
    speeds = [max(float(s), 0.0) if math.isfinite(float(s)) else 0.0 for s in speeds]
    if not any(speeds):
        speeds = [1.0] * count
    fixed = set()
    while True:
        free = [i for i in range(count) if i not in fixed]
        left = global_batch - minimum * len(fixed)
        total = sum(speeds[i] for i in free)
        exact = {i: (left * speeds[i] / total if total > 0 else left / len(free)) for i in free}
        low = [i for i in free if exact[i] < minimum]
        if not low:
            break
        fixed.update(low)
    out = [minimum if i in fixed else int(math.floor(exact[i])) for i in range(count)]
    order = sorted(free, key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in order[: global_batch - sum(out)]:
        out[i] += 1
    return out


def even_shares(global_batch, replicas):
    return [global_batch // replicas + (1 if i < global_batch % replicas else 0) for i in range(replicas)]


def minimum_share(global_batch, replicas, fraction):
    """At least ``fraction`` of an even share, and at least one example."""
    return max(1, int(math.floor(fraction * global_batch / replicas)))


# --------------------------------------------------------------------------- the step

def distribute(strategy, dataset):
    """``dataset`` (global batches) given whole to every replica, for balanced steps that slice it themselves.

    Every worker iterates the same stream in the same order (nothing is
    sharded), so the replicas' slices of one global batch partition it.
    """
    def per_pipeline(context):
        local = max(1, context.num_replicas_in_sync // context.num_input_pipelines)
        if local == 1:
            return dataset
        return dataset.flat_map(lambda *batch: tf.data.Dataset.from_tensors(batch).repeat(local))

    return strategy.distribute_datasets_from_function(per_pipeline)


def supported(model):
    """Why ``model`` cannot record worker times (a sentence), or None when it can."""
    strategy = model.distribute_strategy
    if not is_mirrored(strategy):
        return "worker times and balanced batches need mirrored or multi_worker training"
    if strategy.num_replicas_in_sync < 2:
        return "worker times and balanced batches need two or more replicas"
    if builder.defines_own(model, "train"):
        return f"model {model.name!r} defines its own train_step"
    if plans.of(model).xla.get("train") in ("xla", "fallback"):
        return "balanced batches do not combine with per-replica XLA (jit_compile=off)"
    if (getattr(model, "steps_per_execution", 1) or 1) > 1:
        return "worker times are per step: use steps_per_execution=1"
    return None


def enable(model, global_batch, balance=False, shares=None):
    """Time ``model``'s train step per replica (and, with ``balance``, slice the global batch); returns the state.

    ``global_batch``: the examples of one step over all replicas (with
    gradient accumulation, all micro-batches). ``shares``: the starting
    shares (default even, in multiples of the micro-batches). With
    ``balance`` train on ``distribute(strategy, dataset)``. Call after
    ``compile``; the order with the other step features does not matter.

    Raises:
      ValueError: the model or strategy cannot (``supported``), or ``shares``
        do not sum to ``global_batch`` in multiples of the micro-batches.
    """
    reason = supported(model)
    if reason:
        raise ValueError(f"tfpar.step.stragglers: {reason}.")
    plan = plans.of(model)
    replicas = model.distribute_strategy.num_replicas_in_sync
    count = plan.micro_batches
    if shares is not None:
        shares = list(shares)
    elif count == 1:
        shares = even_shares(global_batch, replicas)
    else:
        shares = shares_for([1.0] * replicas, global_batch, count, multiple=count)
    timing.check_shares(shares, replicas, global_batch, count if balance else 1)
    plan.timing = timing.Timing(model.distribute_strategy, replicas, global_batch, balance, shares, timing.slow_seam())
    builder.install(model)
    return plan.timing


# --------------------------------------------------------------------------- the callback

class WorkerTimes(keras.callbacks.Callback):
    """Per-replica times to TensorBoard and ``report()``; the straggler warning; new shares every ``every`` steps.

    Steps are gathered in windows of ``every`` steps (the first ``skip`` of
    each epoch left out: tracing, iterator start). A worker is named once,
    when its own step time (input + compute) is above ``warn_ratio`` x the
    median in ``windows`` windows in a row. ``rebalance`` recomputes the
    shares at each window's end (``balance`` state only).
    """

    def __init__(self, state, names, every=20, minimum=1, log_dir=None, print_fn=print, warn_ratio=WARN_RATIO,
                 windows=2, skip=1, rebalance=True):
        super().__init__()
        self.state, self.names, self.every, self.minimum = state, list(names), max(1, int(every)), minimum
        self.print_fn, self.warn_ratio, self.windows, self.skip = print_fn, warn_ratio, windows, skip
        self.rebalance = rebalance and state.balance
        self.log_dir = log_dir
        self._writers = None
        self._rows, self._step, self._above = [], 0, {}
        self.history = []  # one dict per window: step, per-replica means, shares
        self.warning = None

    def on_epoch_begin(self, epoch, logs=None):
        self._in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.state.host_begin.assign(time.time())

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._in_epoch += 1
        if self._in_epoch <= self.skip:
            return
        self._rows.append(self.state.times.numpy().tolist())
        if len(self._rows) >= self.every:
            self._close_window()

    def on_train_end(self, logs=None):
        if self._rows:
            self._close_window()
        for writer in (self._writers or {}).values():
            writer.close()

    def _close_window(self):
        rows, self._rows = self._rows, []
        means = [[statistics.fmean(r[i][c] for r in rows) for c in range(len(COLUMNS))] for i in range(len(self.names))]
        own = [m[0] + m[1] for m in means]  # a worker's own step time: input + compute
        shares = self.state.shares.numpy().tolist()
        window = {"step": self._step, "steps": len(rows), "shares": shares,
                  "workers": [dict(zip(("input_ms", "compute_ms", "collective_wait_ms"), m[:3]),
                                   step_ms=o, examples_per_step=m[3], name=n)
                              for m, o, n in zip(means, own, self.names)]}
        self.history.append(window)
        self._write(window)
        self._check(window, own)
        if self.rebalance:
            speeds = [m[3] / m[1] if m[1] > 0 else 0.0 for m in means]
            new = shares_for(speeds, self.state.global_batch, self.minimum, multiple=self._multiple())
            if new != shares:
                self.state.shares.assign(new)

    def _multiple(self):
        """Shares in multiples of 2 (see ``shares_for``) times the micro-batches each replica splits its share into."""
        count = plans.of(self.model).micro_batches if self.model is not None else 1
        return 2 * count if self.state.global_batch % (2 * count) == 0 else count

    def _write(self, window):
        if not self.log_dir:
            return
        if self._writers is None:
            self._writers = {n: tf.summary.create_file_writer(os.path.join(self.log_dir, n.replace(" ", "_")))
                             for n in self.names}
        for worker, share in zip(window["workers"], window["shares"]):
            with self._writers[worker["name"]].as_default():
                for key in ("step_ms", "input_ms", "compute_ms", "collective_wait_ms"):
                    tf.summary.scalar(f"workers/{key}", worker[key], step=window["step"])
                tf.summary.scalar("workers/examples_per_step", share, step=window["step"])
            self._writers[worker["name"]].flush()

    def _check(self, window, own):
        median = statistics.median(own)
        for i, value in enumerate(own):
            above = median > 0 and value > self.warn_ratio * median
            self._above[i] = self._above.get(i, 0) + 1 if above else 0
            if self.warning is None and self._above[i] >= self.windows:
                worker = window["workers"][i]
                parts = {"input": worker["input_ms"], "compute": worker["compute_ms"],
                         "collective wait": worker["collective_wait_ms"]}
                dominant = max(parts, key=parts.get)
                self.warning = (f"tfpar: straggler: {worker['name']} takes {value:.0f} ms of its own per step, "
                                f"{value / median:.2f}x the median {median:.0f} ms, over the last "
                                f"{self.windows * self.every} steps; {dominant} dominates (input "
                                f"{parts['input']:.0f} ms, compute {parts['compute']:.0f} ms, collective wait "
                                f"{parts['collective wait']:.0f} ms per step)"
                                + ("." if self.state.balance else "; --balance_batches gives it a smaller share."))
                if self.print_fn:  # the chief's; the other workers know it too (report()) but stay quiet
                    self.print_fn(self.warning)

    def report(self):
        """What summary.json keeps: the last window per worker, the warning, and the shares over time."""
        last = self.history[-1] if self.history else None
        return {"workers": last["workers"] if last else [], "straggler_warning": self.warning,
                "balance_batches": self.state.balance,
                "shares": last["shares"] if last else self.state.shares.numpy().tolist(),
                "shares_history": [[w["step"], w["shares"]] for w in self.history]}
