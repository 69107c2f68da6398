"""The pipelined ``keras.Model`` that ``tfpar.pipeline.split`` returns.

It holds the original model (so its weights are the original's variables:
``get_weights``, ``save_weights`` and ``load_weights`` of either see the
same values) and a plan: the stage models, their devices, the schedule and
the number of micro-batches. ``train_step`` runs the schedule
(``tfpar.parallel.pipeline.stages``) and makes one optimizer update per step;
``call`` (used by ``evaluate`` and ``predict``) runs the stages in turn,
each on its device. Users ``compile`` and ``fit`` it as any Keras model.
"""

import dataclasses

import keras
import tensorflow as tf

from tfpar.step import pieces
from tfpar.parallel.pipeline import stages as stages_lib


@dataclasses.dataclass
class Plan:
    """How the model is pipelined (a plain object, so Keras does not track the stage models twice)."""

    stages: list  # keras functional models sharing the original's layers
    weights: list  # per stage, its trainable weights
    devices: list  # replicas x stages device names; copy r's stage s at r * S + s (repeats when interleaved)
    schedule: str
    micro_batches: int
    replicas: int
    table: list  # the stage table (tfpar.parallel.pipeline.balance.table)
    trace: object = None  # a stages.Trace when the build is instrumented
    devices_per_copy: int = None  # D; interleaved_1f1b puts stage s on device s mod D (default D = stages)


class PipelineModel(keras.Model):
    """``original`` trained as a pipeline of ``plan.stages`` (built by ``tfpar.pipeline.split``)."""

    def __init__(self, original, plan, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{original.name}_pipeline"), **kwargs)
        self.original = original
        self._plan = plan
        self.built = True

    @property
    def plan(self):
        return self._plan

    @property
    def stage_table(self):
        return self._plan.table

    def call(self, inputs, training=False):
        x = inputs
        for stage, device in zip(self._plan.stages, self._plan.devices):
            with tf.device(device):
                x = stage(x, training=training)
        return x

    def compute_output_spec(self, inputs, training=False):
        return self.original.compute_output_spec(inputs)

    def train_step(self, data):
        x, y, sample_weight = pieces.unpack(data)
        plan = self._plan
        count = plan.micro_batches * plan.replicas
        size = next(t for t in tf.nest.flatten(x) if t is not None).shape[0]
        if size is not None and size % count:
            raise ValueError(f"A batch of {size} does not split into {plan.micro_batches} micro-batches x "
                             f"{plan.replicas} pipeline copies; make the batch a multiple of {count}.")
        parts = pieces.split((x, y, sample_weight), count)
        grads_and_vars, loss, y_pred = stages_lib.run(self, plan, parts, trace=plan.trace)
        self._loss_tracker.update_state(loss, sample_weight=pieces.batch_size(x))
        self.optimizer.apply_gradients(grads_and_vars)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        raise NotImplementedError("A pipelined model is saved through its weights: save_weights, or the "
                                  "original model's save().")
