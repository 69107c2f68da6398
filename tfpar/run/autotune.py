"""``autotune``: time short trials of the step settings left to tfpar, on the real model, data and strategy.

Each trial installs one setting with the step features (``tfpar.step.xla``,
``all_reduce``, ``steps``), runs a few ``fit`` steps on the user's own
``tf.data.Dataset`` and takes the median step time after the first steps
(the first ones trace and compile). ``tfpar.core.tuning`` decides which
settings to time, in a pruned order, and picks the fastest; the choice is
kept in ``tfpar.core.tuning_cache`` so the next run of the same shape skips
the trials and says so.

Trials must not change training: every variable of the model, its optimizer
and its metrics is copied before the first trial and written back after each
one. The data is the subtle part: every ``fit`` makes a new iterator, but a
``shuffle`` that reshuffles each iteration (tf.data's default) draws a new
order for every new iterator of the same dataset object, so trials on the
run's own dataset would change the order the run then sees. Trials
therefore run on a copy built by the function passed as ``dataset``
(``tfpar-train`` builds its pipeline a second time); a dataset object passed
directly is used as it is, with that caveat in the docstring. A model tuned
here and trained ends bit-identical to the same model given the chosen
settings by hand (``tests/test_autotune.py``).

What it tunes, each only where it can change anything:

* XLA per replica (``tfpar.step.xla``), on or off;
* the all-reduce bucket size and dtype, with two or more replicas under a
  mirrored strategy;
* micro-batches that keep the batch of one update, only for models without
  BatchNormalization (which would normalise each micro-batch by its own,
  smaller statistics and so train differently).

The precision policy cannot change on a built model, so ``tune_precision``
times it on models it builds itself, one per policy the machine can run
(``tfpar.runtime.precision.candidates``), before the run builds its own;
``tfpar-train --precision=auto --autotune`` does that first
(``tfpar.run.hooks.keras_fit``), then tunes the other settings on the model
of the chosen policy.
"""

import hashlib
import json
import statistics
import time

from tfpar.core import tuning, tuning_cache

WARMUP_STEPS = 2  # traced, compiled, first-run steps: not timed
TIMED_STEPS = 5  # 3 could not separate settings within 20% of each other on a 2-core CPU
TRIAL_STEPS = WARMUP_STEPS + TIMED_STEPS  # the fewest steps one trial takes
BUCKET_MB = (25.0, 0.0, 5.0)  # the default first, then Keras's single all-reduce, then smaller buckets
MICRO_BATCHES = (1, 2, 4)
SETTINGS = ("xla", "bucket_mb", "all_reduce_dtype", "micro_batches")


def versions():
    from tfpar.core import summary

    found = summary.versions()
    return {name: found[name] for name in ("tfpar", "tensorflow", "keras")}


def model_signature(model, policy=True):
    """A short hash of what makes ``model`` fast or slow: layer kinds, weight shapes and dtypes, optimizer, policy.

    ``policy=False`` leaves the dtype policy out: the shape of a precision search, whose models differ in it.
    """
    parts = [type(model).__name__, type(model.optimizer).__name__] + ([str(model.dtype_policy.name)] if policy else [])
    parts += [f"{type(layer).__name__}" for layer in model._flatten_layers(include_self=False)]
    parts += [f"{tuple(v.shape)}:{v.dtype}" for v in model.weights]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def device_description(strategy):
    """'2 x CPU (AMD EPYC ...)': the kind and count of the devices the strategy computes on."""
    import tensorflow as tf

    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError, NotImplementedError):  # the default strategy: TF's first device
        logical = tf.config.list_logical_devices()
        gpus = [d.name for d in logical if d.device_type == "GPU"]
        devices = gpus[:1] or [logical[0].name]
    kinds = sorted({d.upper().rsplit("/", 1)[-1].split(":")[-2] if ":" in d else d for d in devices})
    name = ""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and "GPU" in kinds:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    elif "CPU" in kinds:
        name = _cpu_name()
    return f"{len(devices)} x {'+'.join(kinds)}" + (f" ({name})" if name else "")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def space_for(model, batch_size, tune=SETTINGS):
    """setting -> candidates for ``model`` on its strategy (the untimed ``auto`` choice first).

    ``tune``: the settings the user left to tfpar; the others keep the model's current values.
    """
    from tfpar.core.devices import is_mirrored
    from tfpar.step import all_reduce, reduce, xla
    from tfpar.step import plan as plans

    strategy = model.distribute_strategy
    replicas = strategy.num_replicas_in_sync
    plan = plans.of(model)
    current = current_setting(model)
    rule = xla.resolve("auto", strategy)
    space = {"xla": [rule, not rule] if "xla" in tune else [current["xla"]]}
    summing = replicas > 1 and is_mirrored(strategy)
    space["bucket_mb"] = list(BUCKET_MB) if summing and "bucket_mb" in tune else [current["bucket_mb"]]
    has_hook = getattr(type(reduce.target(model.optimizer)), reduce.HOOK, None) is not None
    space["all_reduce_dtype"] = (list(all_reduce.DTYPES) if summing and has_hook and "all_reduce_dtype" in tune
                                 else [current["all_reduce_dtype"]])
    per_replica = batch_size // replicas if batch_size else 0
    splittable = "micro_batches" in tune and not _has_batch_norm(model)
    space["micro_batches"] = ([k for k in MICRO_BATCHES if per_replica % k == 0 and per_replica // k >= 2] or [1]
                              if splittable else [plan.micro_batches])
    return space


def _has_batch_norm(model):
    import keras

    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())


def current_setting(model):
    """The model's settings now, in ``SETTINGS`` terms."""
    from tfpar.step import all_reduce
    from tfpar.step import plan as plans

    plan = plans.of(model)
    dtype, bucket_bytes = all_reduce.settings(model.optimizer)
    return {"xla": any(mode in ("xla", "tpu") for mode in plan.xla.values()),
            "bucket_mb": (bucket_bytes / 2 ** 20) if bucket_bytes else 0.0,
            "all_reduce_dtype": dtype, "micro_batches": plan.micro_batches}


def install(model, setting):
    """Give ``model`` ``setting`` through the step features (each rebuilds the step from the plan)."""
    from tfpar.step import all_reduce, steps, xla

    replicas = model.distribute_strategy.num_replicas_in_sync
    all_reduce.apply(model.optimizer, setting["all_reduce_dtype"], replicas)
    xla.enable(model, bool(setting["xla"]))
    steps.accumulate(model, int(setting["micro_batches"]))
    all_reduce.buckets(model, float(setting["bucket_mb"]))


class _State:
    """Every variable of a model, its optimizer and metrics, copied now and written back on ``restore``.

    The optimizer is built first: otherwise the first trial would create its slots (momentum, Adam's
    moments), and the run would start from the trials' slot values instead of zeros.
    """

    def __init__(self, model):
        optimizer = model.optimizer
        if not optimizer.built:
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
        seen, self.variables = set(), []
        for v in list(model.variables) + list(model.optimizer.variables) + list(model.metrics_variables):
            if id(v) not in seen:
                seen.add(id(v))
                self.variables.append(v)
        self.values = [v.numpy() for v in self.variables]

    def restore(self):
        for v, value in zip(self.variables, self.values):
            v.assign(value)


def time_steps(model, dataset, executions, clock=time.perf_counter):
    """Median seconds per step of ``executions`` timed ``fit`` calls of the step function, after the warm-up."""
    import keras

    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    stamps = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(clock())

    model.fit(dataset, epochs=1, steps_per_epoch=(WARMUP_STEPS + executions) * per_call, verbose=0,
              callbacks=[Clock()], shuffle=False)
    gaps = [b - a for a, b in zip(stamps[WARMUP_STEPS - 1:], stamps[WARMUP_STEPS:])]
    return statistics.median(gaps) / per_call


def shape_of(model, batch_size, space):
    strategy = model.distribute_strategy
    return {"model": model_signature(model), "devices": device_description(strategy),
            "replicas": strategy.num_replicas_in_sync, "batch": batch_size,
            "space": {name: list(values) for name, values in space.items()}}


def budget_steps(budget, planned_steps):
    """The steps ``budget`` allows: a fraction (< 1) of ``planned_steps``, or a number of steps."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"autotune_budget must be a positive fraction of the run (< 1) or a number of steps, "
                         f"got {budget!r}.")
    return int(budget * planned_steps) if budget < 1 else int(budget)


def budget_trials(budget, planned_steps):
    """How many trials ``budget`` allows (``budget_steps``).

    Raises ``ValueError`` with one sentence when it allows less than one trial.
    """
    steps = budget_steps(budget, planned_steps)
    if steps < TRIAL_STEPS:
        what = f"{budget:g} of {planned_steps} planned steps is {steps}" if budget < 1 else f"{steps} steps"
        raise ValueError(f"autotune_budget {what}, fewer than the {TRIAL_STEPS} steps of one trial; "
                         f"raise --autotune_budget (e.g. --autotune_budget={TRIAL_STEPS * 4} steps).")
    return steps // TRIAL_STEPS


def autotune(model, strategy=None, dataset=None, *, batch_size=None, tune=SETTINGS, budget=None,
             planned_steps=None, cache=True, print_fn=print, clock=time.perf_counter, environ=None):
    """Time the step settings left to tfpar on ``model`` and ``dataset``, install the fastest; return a report.

    Args:
      model: a compiled Keras model (compiled in ``strategy.scope()`` for a strategy).
      strategy: the model's strategy (default: the one it was compiled under).
      dataset: a function that builds the training ``tf.data.Dataset`` (batched as ``fit`` gets it),
        called once for a copy the trials read, so the run's own dataset is untouched; or the dataset
        itself, whose later order changes if it reshuffles each iteration (each trial makes an iterator).
        It must hold ``TRIAL_STEPS`` batches per trial (a repeated dataset always does).
      batch_size: the global batch (default: read from the dataset's element spec).
      tune: the settings to time ("xla", "bucket_mb", "all_reduce_dtype", "micro_batches").
      budget: at most this many trial steps (a number), or this fraction of ``planned_steps``.
      cache: read and write the choice in the cache dir (``tfpar.core.tuning_cache``).
      clock: the seconds clock trials read.

    Returns:
      A dict for summary.json: ``choice``, ``trials``, ``cached`` (the file used, or None), ``table``.

    Raises:
      ValueError: one sentence, e.g. nothing to tune, a budget too small for one trial, an iterator.
    """
    import tensorflow as tf

    if not getattr(model, "compiled", False):
        raise ValueError("tfpar autotune needs a compiled model; call model.compile(...) first.")
    if not model.built:
        raise ValueError("tfpar autotune needs a built model (trials must not create its weights); build it "
                         "first, e.g. with keras.Input or model.build(input_shape).")
    if strategy is not None and strategy is not model.distribute_strategy:
        raise ValueError("tfpar autotune: the model was compiled under another strategy; compile it in "
                         "strategy.scope().")
    if callable(dataset) and not isinstance(dataset, tf.data.Dataset):
        dataset = dataset()
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"tfpar autotune needs the training tf.data.Dataset or a function that builds it (each "
                         f"trial makes its own iterator), got {type(dataset).__name__}.")
    from tfpar.core.devices import is_multi_worker

    if is_multi_worker(model.distribute_strategy):
        raise ValueError("tfpar autotune runs on one worker's devices; multi-worker runs are not tuned yet "
                         "(tune on one worker and set the chosen flags by hand).")
    unknown = sorted(set(tune) - set(SETTINGS))
    if unknown:
        raise ValueError(f"Unknown autotune setting(s) {', '.join(unknown)}; choose from: {', '.join(SETTINGS)}.")
    batch_size = batch_size or _batch_of(dataset)
    space = space_for(model, batch_size, tune)
    if not tuning.tuned(space):
        raise tuning.NothingToTune(
            f"Nothing to tune on this model and strategy: {_fixed_reason(model, tune)}.")
    if budget is None:
        max_trials = None
    elif budget < 1 and planned_steps is None:
        raise ValueError("A fractional autotune budget needs planned_steps (the steps of the run).")
    else:
        max_trials = budget_trials(budget, planned_steps or 0)
    return _tune(model, dataset, batch_size, space, max_trials, cache, print_fn, clock, environ)


def _tune(model, dataset, batch_size, space, max_trials, cache, print_fn, clock, environ):
    say = print_fn or (lambda line: None)
    shape, here = shape_of(model, batch_size, space), versions()
    if cache:
        try:
            entry = tuning_cache.load(shape, here, environ)
        except tuning_cache.Stale as stale:
            say(f"warning: {stale}")
            entry = None
        if entry is not None:
            choice = entry["choice"]
            install(model, choice)
            path = tuning_cache.path_for(shape, environ)
            say(f"autotune: the cached choice for this model and devices ({path}): {_describe(choice)}; no trials.")
            return {"choice": choice, "trials": entry.get("trials", []), "cached": path, "table": []}
    state = _State(model)
    start = {name: values[0] for name, values in space.items()}
    traced = {}  # setting -> the train function its trial traced, reused by a second trial and by the run

    def trial(setting):
        install(model, setting)
        key = _key(setting)
        model.train_function = traced.get(key)
        try:
            return time_steps(model, dataset, TIMED_STEPS, clock)
        finally:
            traced[key] = model.train_function
            state.restore()

    result = tuning.search(space, trial, start, max_trials)
    install(model, result.choice)
    # The run keeps the function its trial traced: on ResNet-50 in one process, windows after the step was
    # traced a second time ran at a median 0.94 of the windows before, against 1.05 with the step traced
    # once (14 and 7 processes; benchmarks/README.md).
    model.train_function = traced.get(_key(result.choice))
    traced.clear()
    state.restore()
    lines = tuning.table(result, tuning.tuned(space))
    say(f"autotune: {len(result.trials)} trials of {TRIAL_STEPS} steps"
        + (" (the budget ended the search early)" if result.cut_short else "") + ":")
    for line in lines:
        say("  " + line)
    say(f"autotune: chose {_describe(result.choice)}.")
    report = {**result.as_dict(), "cached": None, "table": lines}
    if cache:
        tuning_cache.store(shape, here, result.as_dict(), environ)
    return report


def tune_precision(build, dataset, policies, *, batch_size, max_trials=None, cache=True, print_fn=print,
                   clock=time.perf_counter, environ=None):
    """Time one trial of the step under each policy of ``policies`` and return the fastest policy's name.

    Args:
      build: ``policy name -> compiled model`` built under that global dtype policy, its step features
        installed; each trial's model is dropped after its trial, and the caller builds the run's own.
      dataset: a function that builds a copy of the training ``tf.data.Dataset`` for the trials.
      policies: the allowed policies, the untimed choice first (``tfpar.runtime.precision.candidates``).
      batch_size: the global batch of one update (part of the cached shape).
      max_trials: at most this many trials (each builds a model).

    Returns:
      ``(policy, report)``: report as ``autotune``'s, for summary.json's ``autotune.precision``.
    """
    from tfpar.runtime import precision

    say = print_fn or (lambda line: None)
    policies, shape = list(policies), None
    models = {policies[0]: build(policies[0])}  # the first trial's model; its signature names the cached shape
    if cache:
        first = models[policies[0]]
        shape = {**shape_of(first, batch_size, {"precision": policies}), "model": model_signature(first, False)}
        try:
            entry = tuning_cache.load(shape, versions(), environ)
        except tuning_cache.Stale as stale:
            say(f"warning: {stale}")
            entry = None
        if entry is not None:
            choice, path = entry["choice"]["precision"], tuning_cache.path_for(shape, environ)
            say(f"autotune: the cached precision for this model and devices ({path}): {choice}; no trials.")
            return choice, {"choice": {"precision": choice}, "trials": entry.get("trials", []), "cached": path,
                            "table": []}
    trial_data = dataset()

    def trial(setting):
        model = models.pop(setting["precision"], None) or build(setting["precision"])
        return time_steps(model, trial_data, TIMED_STEPS, clock)

    result = tuning.search({"precision": policies}, trial, max_trials=max_trials)
    lines = tuning.table(result)
    for row, timed in enumerate(result.trials, start=1):  # each row names its numerics, before any mark
        cells, mark, rest = lines[row].partition("  <-")
        lines[row] = f"{cells}  ({precision.NUMERICS[timed.setting['precision']]}){mark}{rest}"
    say(f"autotune: {len(result.trials)} precision trials of {TRIAL_STEPS} steps, each on its own model"
        + (" (the budget ended the search early)" if result.cut_short else "") + ":")
    for line in lines:
        say("  " + line)
    say(f"autotune: chose precision {result.choice['precision']}.")
    if cache:
        tuning_cache.store(shape, versions(), result.as_dict(), environ)
    return result.choice["precision"], {**result.as_dict(), "cached": None, "table": lines}


def _key(setting):
    return tuple(sorted(setting.items()))


def _batch_of(dataset):
    import tensorflow as tf

    first = tf.nest.flatten(dataset.element_spec)[0]
    size = first.shape[0] if first.shape.rank else None
    if size is None:
        size = int(tf.nest.flatten(next(iter(dataset.take(1))))[0].shape[0])
    return int(size)


def _fixed_reason(model, tune):
    replicas = model.distribute_strategy.num_replicas_in_sync
    reasons = ["XLA is fixed" if "xla" not in tune else "XLA cannot change"]
    if replicas < 2:
        reasons.append("one replica sums no gradients")
    elif not {"bucket_mb", "all_reduce_dtype"} & set(tune):
        reasons.append("the all-reduce is fixed")
    if "micro_batches" not in tune:
        reasons.append("micro-batches are fixed")
    elif _has_batch_norm(model):
        reasons.append("BatchNormalization rules out micro-batches")
    else:
        reasons.append("the batch does not split into micro-batches of 2 or more")
    return ", ".join(reasons)


def _describe(setting):
    return ", ".join(f"{tuning.LABELS[name]} {tuning.show(setting[name])}" for name in tuning.ORDER if name in setting)


def cached_xla(model, environ=None):
    """``jit_compile=auto`` without ``--autotune``: the XLA choice an earlier tuning of this model here made.

    Returns ``(on, path)``, or ``None`` when this model was never tuned on these devices with these versions.
    """
    signature, devices = model_signature(model), device_description(model.distribute_strategy)
    entry = tuning_cache.find(lambda s: s.get("model") == signature and s.get("devices") == devices
                              and len(s.get("space", {}).get("xla", [])) > 1, versions(), environ)
    if entry is None:
        return None
    return bool(entry["choice"]["xla"]), entry["path"]
