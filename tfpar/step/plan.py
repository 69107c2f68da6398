"""The step plan: what every step feature asked of one model, in one object on it.

Features (gradient accumulation, gradient buckets, the all-reduce dtype,
per-replica XLA, worker timing and balanced shares, the parameter-server and
DTensor steps) never replace a model's ``train_step`` themselves. Each sets
its fields here and asks ``tfpar.step.builder.install`` to build the steps the
whole plan describes, so the order in which they are switched on does not
matter. A plan that asks for nothing leaves Keras's own steps in place.
"""

import dataclasses

ATTRIBUTE = "_tfpar_plan"  # the one private attribute tfpar keeps on a model for its steps


@dataclasses.dataclass
class StepPlan:
    """What a model's train/test/predict steps must do beyond Keras's own."""

    micro_batches: int = 1  # gradients summed over this many micro-batches before one update
    reduction: object = None  # the optimizer's tfpar.step.reduce.Reduction: all-reduce dtype and bucket size
    xla: dict = dataclasses.field(default_factory=dict)  # step kind -> "xla" | "fallback" | "custom" | "tpu"
    timing: object = None  # a tfpar.step.timing.Timing: replica times, and balanced shares when it balances
    partitioned: bool = False  # gradients through weights partitioned over parameter servers
    staleness: tuple = None  # (updates, staleness sum) counters a parameter-server step adds to
    relayout: object = None  # grads -> grads in their weights' layouts (DTensor)
    layouts: object = None  # the DTensor layouts the model's functions were made for
    installed: set = dataclasses.field(default_factory=set)  # step kinds the builder put on the model

    def bucketed(self):
        """Whether the step sums gradients in buckets itself (None bucket size: Keras's single all-reduce)."""
        return self.reduction is not None and self.reduction.bucket_bytes is not None

    def needs(self, kind):
        """Whether the ``kind`` step ('train' | 'test' | 'predict') must be tfpar's."""
        compiled = self.xla.get(kind) in ("xla", "fallback")
        if kind == "train":
            return compiled or self.micro_batches > 1 or self.bucketed() or self.timing is not None
        return compiled


def of(model):
    """``model``'s plan, made (empty: Keras's own steps) on first use."""
    plan = model.__dict__.get(ATTRIBUTE)
    if plan is None:
        plan = StepPlan()
        setattr(model, ATTRIBUTE, plan)
    return plan
