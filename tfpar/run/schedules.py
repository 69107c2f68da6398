"""Learning rates: linear scaling by batch size, warmup, then cosine or step decay.

The rule (Goyal et al., 2017, "Accurate, Large Minibatch SGD"): a learning
rate tuned at a reference batch scales linearly with the batch each optimizer
update averages over. tfpar makes it explicit:

    peak = learning_rate * global_batch_size * grad_accum_steps / lr_reference_batch

(``lr_reference_batch=0`` turns scaling off: ``peak = learning_rate``.)
The rate rises linearly from 0 to ``peak`` over the warmup steps, then
follows a cosine to 0, steps down by ``decay_rate`` at each boundary, or stays.
Steps are training steps (batches), which is what Keras optimizers feed a
schedule, also under gradient accumulation.
"""

import math

import keras

KINDS = ("cosine", "step", "constant")


def scaled_learning_rate(learning_rate, global_batch_size, grad_accum_steps=1, reference_batch=256):
    """``learning_rate`` scaled to the batch of one optimizer update (see module doc)."""
    if not reference_batch:
        return float(learning_rate)
    return float(learning_rate) * global_batch_size * grad_accum_steps / reference_batch


@keras.saving.register_keras_serializable(package="tfpar")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak``, then ``cosine`` / ``step`` / ``constant``."""

    def __init__(self, peak, total_steps, warmup_steps=0, kind="cosine", boundaries=(), decay_rate=0.1):
        if kind not in KINDS:
            raise ValueError(f"Unknown learning-rate schedule {kind!r}; choose one of: {', '.join(KINDS)}.")
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.kind, self.boundaries, self.decay_rate = kind, tuple(int(b) for b in boundaries), float(decay_rate)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 0))
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = ops.clip((step - warmup) / span, 0.0, 1.0)
            after = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        elif self.kind == "step":
            passed = sum(ops.cast(step >= b, "float32") for b in self.boundaries) if self.boundaries else 0.0
            after = self.peak * ops.power(self.decay_rate, passed)
        else:
            after = ops.convert_to_tensor(self.peak, "float32")
        if not warmup:
            return after
        return ops.where(step < warmup, self.peak * (step + 1.0) / warmup, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "boundaries": list(self.boundaries), "decay_rate": self.decay_rate}
