"""Gradient accumulation that works under strategies: ``accumulate(model, k)``.

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
micro-batch in order, as with batches of that size (``tfpar.step.pieces``).

``accumulate`` sets the plan's ``micro_batches``; ``tfpar.step.builder``
builds the step, with whatever else the plan holds (XLA, buckets, timing,
balanced shares), in any order.
"""

from tfpar.step import builder, timing
from tfpar.step import plan as plans


def micro_batches(model):
    """How many micro-batches each train step of ``model`` splits its batch into (1: no accumulation)."""
    return plans.of(model).micro_batches


def accumulate(model, micro_batches):
    """Make every train step of ``model`` sum gradients over ``micro_batches`` before one update.

    Call after ``model.compile``. Each per-replica batch (with balanced
    shares: each replica's share) must divide evenly into ``micro_batches``;
    batch the data at ``micro_batches`` times the micro-batch.
    ``micro_batches=1`` undoes it.

    Raises:
      ValueError: ``micro_batches`` is not a positive integer, the model is not
        compiled, or its class defines its own ``train_step``.
    """
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}.")
    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.step.steps.accumulate needs a compiled model; call model.compile(...) first.")
    if micro_batches > 1 and builder.defines_own(model, "train"):
        raise ValueError(f"Model {model.name!r} defines its own train_step, which tfpar cannot split into "
                         f"micro-batches; use grad_accum_steps=1.")
    plan = plans.of(model)
    if plan.timing is not None and plan.timing.balance:  # each replica's share is split into its micro-batches
        timing.check_shares(plan.timing.shares.numpy().tolist(), plan.timing.replicas, plan.timing.global_batch,
                            micro_batches)
    plan.micro_batches = micro_batches
    builder.install(model)
