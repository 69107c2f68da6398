"""Pipeline (layer) parallelism for Keras 3 on the devices of one process.

``split(model, stages=S, micro_batches=M)`` cuts a functional or Sequential
model (several inputs and outputs, nested functional models such as a
keras-hub backbone opened up) into S consecutive stages on S devices (or V
stages on each of D devices for interleaved 1F1B) and returns a
``keras.Model`` that trains them as a pipeline: each step splits its batch
into M micro-batches, runs them through the stages in the GPipe, 1F1B or
interleaved 1F1B order,
sums the gradients and makes one optimizer update. See docs/pipeline.md.

Modules: ``graph`` (the model as a flat list of ops), ``partition`` (where a model can be cut), ``balance`` (costs and
the exact best cuts), ``schedules`` (task orders), ``stages`` (one step's
graph), ``placement`` (devices), ``model`` (the Keras model), ``driver``
(``tfpar-train --strategy=pipeline``).
"""

import logging

from tfpar.parallel.pipeline import balance as balance_lib
from tfpar.parallel.pipeline import partition, placement, schedules
from tfpar.parallel.pipeline.model import PipelineModel, Plan

log = logging.getLogger("tfpar")

DEFAULT_TIMING_BATCH = 32


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def plan_stages(model, stages, balance="time", devices=None, micro_batch=8, devices_per_copy=None,
                micro_batches=None):
    """Cut ``model`` into ``stages``: ``(units, counts, table)`` without building the pipelined model.

    ``counts[s]`` is how many of ``units`` stage s holds; ``table`` the stage
    table (with measured ms when ``balance="time"``, else ``None`` there).
    ``devices_per_copy`` below ``stages`` (interleaved 1F1B) balances each
    device's summed stages and the slowest stage at ``micro_batches``
    (``balance.best_round_robin``) instead of single stages.
    """
    _positive("stages", stages)
    unit_list = partition.units(model)
    balance = balance_lib.check(balance)
    if isinstance(balance, list):
        counts = partition.groups_from_names(unit_list, balance, model)
        if len(counts) != stages:
            raise ValueError(f"{len(balance)} cut layer(s) make {len(counts)} stages, but stages={stages}; "
                             f"give stages - 1 = {stages - 1} cut layer names.")
    elif stages > len(unit_list):
        raise ValueError(f"Model {model.name!r} can be cut at {len(unit_list) - 1} places, so into at most "
                         f"{len(unit_list)} stages; got stages={stages}.")
    devices = devices or ["/cpu:0"] * stages
    times = balance_lib.time_units(unit_list, micro_batch, devices[0]) if balance == "time" else None
    if not isinstance(balance, list):
        costs = times if balance == "time" else balance_lib.unit_costs(unit_list, balance)
        if devices_per_copy and devices_per_copy < stages:  # interleaved: V stages a device, round-robin
            counts, _ = balance_lib.best_round_robin(costs, stages, devices_per_copy, micro_batches)
        else:
            counts, _ = balance_lib.best_partition(costs, stages)
    return unit_list, counts, balance_lib.table(unit_list, counts, devices, times=times)


def split(model, stages=2, micro_batches=4, schedule="1f1b", balance="time", devices=None, replicas=1,
          batch_size=None, print_fn=print, pipeline_devices=None):
    """``model`` as a pipeline of ``stages`` stages over ``micro_batches`` micro-batches: a ``keras.Model``.

    Args:
      model: a built functional or Sequential Keras model (e.g. any
        ``tfpar.models`` builder, or a model around a keras-hub backbone,
        with dict inputs). Its layers and weights are shared.
      stages: S, the number of consecutive stages (and devices per copy).
      micro_batches: M, micro-batches per step; the batch must divide by M x replicas.
      schedule: ``"1f1b"`` (at most S micro-batches' activations per stage), ``"gpipe"``, or
        ``"interleaved_1f1b"`` (S = V x D stages on D = ``pipeline_devices`` devices, stage s on
        device s mod D; needs M >= S; a bubble of (D-1)/(VM+D-1) instead of (D-1)/(M+D-1)).
      balance: ``"time"`` (time each unit's forward+backward with one
        micro-batch, then the exact best cuts), ``"flops"``, ``"params"``,
        ``"layers"``, or a list (or comma-separated string) of S - 1 layer
        names after which stages end.
      devices: D x replicas device names (D = S but for the interleaved schedule); default the
        local GPUs, else the logical CPUs (``tfpar.strategies.configure_virtual_cpus``).
      replicas: D copies of the pipeline on D x S devices; each stage's
        gradients are summed over its copies onto the first copy's device.
      batch_size: the global batch it will train on, for timing one
        micro-batch (default 32).
      print_fn: where the stage table is printed (``None``: quiet).
      pipeline_devices: D, the devices of one pipeline copy; default S, or for
        ``"interleaved_1f1b"`` ``len(devices) / replicas``.

    Returns:
      A ``PipelineModel`` (a ``keras.Model``); compile and fit it as usual.
      ``.stage_table`` holds the stage table.
    """
    for name, value in (("stages", stages), ("micro_batches", micro_batches), ("replicas", replicas)):
        _positive(name, value)
    per_copy = _devices_per_copy(schedule, stages, devices, replicas, pipeline_devices)
    schedules.check_shape(schedule, stages, per_copy, micro_batches)
    if getattr(model, "optimizer", None) is not None and model.optimizer.built:
        raise ValueError(f"Model {model.name!r} already has a built optimizer; split it before compile/fit.")
    partition.units(model)  # a subclassed model fails here, before devices are looked at
    found = placement.resolve(devices, per_copy * replicas,
                              "stages x replicas" if per_copy == stages else "pipeline_devices x replicas")
    devices = [found[r * per_copy + schedules.device_of(s, per_copy)] for r in range(replicas) for s in range(stages)]
    micro = max(1, (batch_size or DEFAULT_TIMING_BATCH) // (micro_batches * replicas))
    unit_list, counts, table = plan_stages(model, stages, balance, devices[:stages], micro, per_copy, micro_batches)
    stage_models = partition.stage_models(unit_list, counts, name=f"{model.name}_stage")
    weights = [list(m.trainable_weights) for m in stage_models]
    for s, stage_model in enumerate(stage_models):
        placement.move_variables(stage_model.variables, devices[s])
    partition.check_per_example(stage_models, devices[:stages], model.name)
    plan = Plan(stage_models, weights, devices, schedule, micro_batches, replicas, table, devices_per_copy=per_copy)
    if print_fn:
        on = f" on {per_copy} device(s)" if per_copy != stages else ""
        print_fn(f"pipeline: {stages} stage(s){on} x {replicas} copy(ies), {micro_batches} micro-batches, "
                 f"schedule {schedule}, balance {balance}\n" + balance_lib.format_table(table))
    return PipelineModel(model, plan)


def _devices_per_copy(schedule, stages, devices, replicas, pipeline_devices):
    """D, the devices of one pipeline copy: as given, else S, else (interleaved) the devices named per copy."""
    schedules.check(schedule)
    if pipeline_devices is not None:
        _positive("pipeline_devices", pipeline_devices)
        return pipeline_devices
    if schedule != "interleaved_1f1b":
        return stages
    if devices is None:
        raise schedules.ScheduleError(
            "Schedule interleaved_1f1b puts several stages on each device, so it needs the device count: pass "
            "pipeline_devices=D (stages = V x D) or the devices of each copy.")
    return max(1, len(list(devices)) // replicas)


__all__ = ["split", "plan_stages", "PipelineModel", "Plan", "partition", "schedules", "placement"]
