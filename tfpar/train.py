"""The training driver: ``TrainConfig`` -> ``run()`` -> summary dict.

cluster -> data check -> strategy -> precision -> model -> data -> compile ->
fit -> evaluate -> summary.json. Each step calls the module that owns it.

Strategies that need their own setup around training (DTensor sharding: Keras
``fit`` on a mesh via ``tfpar.sharding.layout_scope``; parameter servers: not
Keras ``fit``) plug in through ``TRAINING_LOOPS``: one line each.
"""

import dataclasses
import importlib
import logging
import os
import re
import tempfile
import time

log = logging.getLogger("tfpar")

OPTIMIZERS = ("sgd", "adam", "adamw")
JIT_COMPILE = ("auto", "on", "off")
LAUNCHERS = ("", "ray")
DEFAULT_GLOBAL_BATCH = 64

# Strategy name -> "module:function" for strategies that need their own training
# loop instead of Keras ``fit``. The function is called as ``fn(config, cluster,
# print_fn)`` with a validated ``TrainConfig`` and ``tfpar.cluster.ClusterInfo``
# and returns a dict of results (keys as ``fit_loop`` returns; at least
# strategy, replicas, precision, epochs_done, steps_done). ``run()`` adds config,
# versions, task and wall time, and writes the summaries.
TRAINING_LOOPS = {
    "dtensor": "tfpar.sharding:train",
    "parameter_server": "tfpar.parameter_server:run_config",
}
OWN_LOOP_STRATEGIES = ("dtensor", "parameter_server")  # not a tf.distribute strategy's fit (DESIGN items 4, 5)


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. ``validate()`` checks it once.

    The CLI defines one flag per field, so a field's comment in ``cli._HELP``
    is its documentation.
    """

    model: str = "resnet18"
    num_classes: int = 10
    image_size: int = 32
    width_multiplier: float = 1.0
    bn_momentum: float = 0.9
    strategy: str = "auto"
    virtual_cpus: int | None = None
    precision: str = "float32"
    data: str = "digits"
    batch_size: int | None = None  # global; DEFAULT_GLOBAL_BATCH when neither batch flag is given
    per_replica_batch_size: int | None = None
    epochs: int = 5
    steps_per_epoch: int | None = None
    validation_steps: int | None = None  # 0: no validation
    optimizer: str = "sgd"
    learning_rate: float = 0.1  # at lr_reference_batch; see tfpar.schedules
    lr_reference_batch: int = 256
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay_epochs: str | None = None  # "30,60,80" for lr_schedule=step
    lr_decay_rate: float = 0.1
    momentum: float = 0.9
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    all_reduce_dtype: str = "float32"  # "bfloat16": half the gradient bytes between replicas (tfpar.all_reduce)
    all_reduce_bucket_mb: float = 25.0  # gradients all-reduced in buckets overlapping backward; 0: Keras's one batch
    jit_compile: str = "auto"
    steps_per_execution: int = 1
    model_dir: str = "runs/default"
    tensorboard: bool = True
    profile_steps: str | None = None  # "A,B"
    checkpoint_best: bool = True
    log_all_workers: bool = False
    mesh: str | None = None  # dtensor only, e.g. "batch=2,model=2"
    layout_rules: str | None = None  # dtensor only: a file of layout rules
    # pipeline only (tfpar.pipeline): stages x micro-batches per step, schedule, cuts, copies
    stages: int = 2
    micro_batches: int = 4
    schedule: str = "1f1b"
    balance: str = "time"
    pipeline_replicas: int = 1
    # stragglers (tfpar.stragglers): every replica's times; batches balanced by measured speed
    worker_times: bool = True
    balance_batches: bool = False
    balance_every: int = 20
    balance_min_fraction: float = 0.25
    seed: int = 0
    verbose: int | None = None  # None: tfpar.callbacks picks a progress bar or one line per epoch
    # fault tolerance (tfpar.backup, tfpar.preemption)
    backup_dir: str = ""  # default: model_dir/backup
    backup_freq: str = "epoch"  # "epoch", a number of steps, or "none"
    keep_backups: bool = False
    cluster_timeout: float = 300.0
    # engines (tfpar.ray)
    launcher: str = ""  # "" (this process is one task) or "ray"
    workers: int = 2  # with launcher=ray: Ray Train workers
    use_gpu: bool = False  # with launcher=ray: one GPU per worker

    def validate(self):
        """Raise ``ValueError`` with one clear sentence for the first bad field."""
        from tfpar import all_reduce, data, models, precision, schedules, strategies

        names = strategies.NAMES + ("dtensor", "pipeline")
        if self.model not in models.names():
            raise ValueError(f"Unknown model {self.model!r}; choose one of: {', '.join(models.names())}.")
        if self.strategy not in names:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(names)}.")
        if self.precision not in precision.POLICIES:
            raise ValueError(f"Unknown precision {self.precision!r}; choose one of: {', '.join(precision.POLICIES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        if self.lr_schedule not in schedules.KINDS:
            raise ValueError(f"Unknown lr_schedule {self.lr_schedule!r}; choose one of: {', '.join(schedules.KINDS)}.")
        if self.all_reduce_dtype not in all_reduce.DTYPES:
            raise ValueError(f"all_reduce_dtype must be one of: {', '.join(all_reduce.DTYPES)}; "
                             f"got {self.all_reduce_dtype!r}.")
        bucket = self.all_reduce_bucket_mb
        if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not 0 <= bucket < float("inf"):
            raise ValueError(f"all_reduce_bucket_mb must be a number >= 0 (MiB of gradients per all-reduce; "
                             f"0: one all-reduce after the backward pass), got {bucket!r}.")
        if self.grad_accum_steps > 1 and self.strategy in ("parameter_server", "dtensor"):
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} works with Keras fit strategies; "
                             f"{self.strategy} trains with its own loop, so use grad_accum_steps=1.")
        if self.all_reduce_dtype != "float32" and self.strategy in ("parameter_server", "dtensor"):
            raise ValueError(f"all_reduce_dtype={self.all_reduce_dtype} works with mirrored and multi_worker "
                             f"training; {self.strategy} does not all-reduce gradients.")
        if self.jit_compile not in JIT_COMPILE:
            raise ValueError(f"jit_compile must be one of: {', '.join(JIT_COMPILE)}; got {self.jit_compile!r}.")
        for name in ("num_classes", "image_size", "epochs", "grad_accum_steps", "steps_per_execution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("batch_size", "per_replica_batch_size", "steps_per_epoch", "validation_steps", "virtual_cpus"):
            value, least = getattr(self, name), 0 if name == "validation_steps" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{name} must be {'an integer >= 0' if least == 0 else 'a positive integer'} "
                                 f"when given, got {value!r}.")
        if self.batch_size is not None and self.per_replica_batch_size is not None:
            raise ValueError("Give batch_size (global) or per_replica_batch_size, not both.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if not isinstance(self.lr_reference_batch, int) or self.lr_reference_batch < 0:
            raise ValueError(f"lr_reference_batch must be an integer >= 0 (0: no scaling), got {self.lr_reference_batch!r}.")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be >= 0 and less than epochs ({self.epochs}), got {self.warmup_epochs!r}.")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"lr_decay_rate must be in (0, 1], got {self.lr_decay_rate!r}.")
        self.decay_boundaries_epochs()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive, got {self.width_multiplier!r}.")
        if self.verbose not in (None, 0, 1, 2):
            raise ValueError(f"verbose must be unset (auto), 0, 1 or 2, got {self.verbose!r}.")
        self.profile_range()
        data.parse(self.data)
        self._validate_fault_tolerance()
        if self.strategy == "dtensor":
            self._validate_dtensor()
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of: {', '.join(repr(n) for n in LAUNCHERS)}; got {self.launcher!r}.")
        if self.launcher and (not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1):
            raise ValueError(f"workers must be a positive integer with launcher={self.launcher}, got {self.workers!r}.")
        if self.strategy == "pipeline":
            from tfpar.pipeline import driver

            driver.check(self)
        self._validate_balance()
        return self

    def _validate_balance(self):
        if not isinstance(self.balance_every, int) or isinstance(self.balance_every, bool) or self.balance_every < 1:
            raise ValueError(f"balance_every must be a positive number of steps, got {self.balance_every!r}.")
        if not 0 < self.balance_min_fraction <= 1:
            raise ValueError(f"balance_min_fraction must be in (0, 1] (of an even share), "
                             f"got {self.balance_min_fraction!r}.")
        if not self.balance_batches:
            return
        if self.strategy not in ("mirrored", "multi_worker"):
            raise ValueError(f"balance_batches works with strategy mirrored or multi_worker, got {self.strategy!r}.")
        for name, ok, fix in (("grad_accum_steps", self.grad_accum_steps == 1, "1"),
                              ("steps_per_execution", self.steps_per_execution == 1, "1"),
                              ("jit_compile", self.jit_compile != "on", "auto or off")):
            if not ok:
                raise ValueError(f"balance_batches needs {name}={fix}, got {getattr(self, name)!r}.")

    def _validate_fault_tolerance(self):
        from tfpar import backup

        if self.backup_freq not in ("none", "off"):
            backup.parse_freq(self.backup_freq)
        if not self.cluster_timeout > 0:
            raise ValueError(f"cluster_timeout must be a positive number of seconds, got {self.cluster_timeout!r}.")

    def _validate_dtensor(self):
        if self.mesh is not None and not re.fullmatch(r"[A-Za-z_]\w*=[1-9]\d*(,[A-Za-z_]\w*=[1-9]\d*)*", self.mesh):
            raise ValueError(f"mesh must look like 'batch=2,model=2' (axis=size, comma-separated), got {self.mesh!r}.")
        if self.layout_rules is not None and not os.path.isfile(self.layout_rules):
            raise ValueError(f"layout_rules file {self.layout_rules!r} does not exist.")

    def profile_range(self):
        """``profile_steps`` "A,B" (or "A") -> ``(A, B)`` with 1 <= A <= B; ``None`` when unset."""
        if not self.profile_steps:
            return None
        parts = str(self.profile_steps).split(",")
        try:
            first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
        except ValueError:
            first = last = None
        if first is None or not 1 <= first <= last:
            raise ValueError(
                f"profile_steps must be 'A,B' with 1 <= A <= B (steps to trace), got {self.profile_steps!r}."
            )
        return first, last

    def decay_boundaries_epochs(self):
        """``lr_decay_epochs`` "30,60,80" -> [30.0, 60.0, 80.0] (increasing, within the run)."""
        if not self.lr_decay_epochs:
            if self.lr_schedule == "step":
                raise ValueError("lr_schedule=step needs lr_decay_epochs, e.g. --lr_decay_epochs=30,60,80.")
            return []
        try:
            values = [float(v) for v in str(self.lr_decay_epochs).split(",")]
        except ValueError:
            values = None
        if not values or values != sorted(values) or values[0] <= 0:
            raise ValueError(f"lr_decay_epochs must be increasing positive epochs like '30,60,80', got {self.lr_decay_epochs!r}.")
        return values

    def global_batch_size(self, replicas):
        """The global batch for ``replicas``: per-replica x replicas, or ``batch_size`` if it divides evenly."""
        if self.per_replica_batch_size is not None:
            return self.per_replica_batch_size * replicas
        batch = self.batch_size or DEFAULT_GLOBAL_BATCH
        if batch % replicas:
            raise ValueError(
                f"batch_size {batch} does not divide evenly over {replicas} replicas; "
                f"use a multiple of {replicas} or --per_replica_batch_size."
            )
        return batch


def resolve_jit_compile(setting, strategy):
    """Whether XLA runs for ``setting`` (auto|on|off) under ``strategy``: a bool.

    ``auto`` is on for GPUs/TPUs and off for CPUs (XLA made ResNet-50 3.5x
    slower on CPU, DESIGN item 11). ``tfpar.xla`` decides and also makes it work
    under tf.distribute strategies, where Keras 3's own ``jit_compile`` fails.
    """
    from tfpar import xla

    return xla.resolve(setting, strategy)


def make_optimizer(config, global_batch_size, steps_per_epoch):
    """The optimizer, with the scaled, warmed-up, decaying learning rate of ``tfpar.schedules``."""
    import keras

    from tfpar import schedules

    peak = schedules.scaled_learning_rate(
        config.learning_rate, global_batch_size, config.grad_accum_steps, config.lr_reference_batch)
    rate = schedules.WarmupDecay(
        peak, total_steps=config.epochs * steps_per_epoch,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)), kind=config.lr_schedule,
        boundaries=[int(round(e * steps_per_epoch)) for e in config.decay_boundaries_epochs()],
        decay_rate=config.lr_decay_rate,
    )
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=config.momentum), peak
    if config.optimizer == "adam":
        return keras.optimizers.Adam(rate), peak
    return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay), peak


def make_loss(config):
    """Sparse cross-entropy, with label smoothing when asked (labels one-hot inside the loss)."""
    import keras

    if not config.label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    num_classes, smoothing = config.num_classes, config.label_smoothing

    def smoothed_sparse_categorical_crossentropy(y_true, y_pred):
        y_true = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), num_classes)
        return keras.losses.categorical_crossentropy(y_true, y_pred, label_smoothing=smoothing)

    return smoothed_sparse_categorical_crossentropy


def build_model(config):
    """``config.model`` from the registry, L2 on kernels unless AdamW decays decoupled."""
    from tfpar import models

    return models.build(
        config.model, num_classes=config.num_classes,
        input_shape=(config.image_size, config.image_size, 3),
        width_multiplier=config.width_multiplier, bn_momentum=config.bn_momentum,
        weight_decay=config.weight_decay if config.optimizer != "adamw" else 0.0,
    )


def fit_loop(config, info, print_fn=print, extra_callbacks=()):
    """The Keras ``fit`` path for every tf.distribute strategy that ``fit`` supports.

    ``print_fn=None`` keeps tfpar's own lines quiet (``config.verbose`` governs Keras's).
    ``extra_callbacks`` are appended to tfpar's own (an engine's reporting, e.g. ``tfpar.ray``).
    """
    from tfpar import data

    source = data.inspect(config.data, config.num_classes, config.seed)  # before TF touches devices

    import keras
    import tensorflow as tf

    from tfpar import all_reduce, backup, callbacks, precision, preemption, steps, stragglers, strategies, summary, xla

    # Fault tolerance: refuse a foreign or damaged backup before anything is written,
    # and never wait forever for peers that do not come up.
    backup_cb = backup.for_run(config, info, print_fn=print_fn)
    pipelined = config.strategy == "pipeline"
    if pipelined:
        from tfpar.pipeline import driver as pipeline_driver

        strategy = pipeline_driver.strategy(config, info)  # the pipeline places its own ops (on tasks in a cluster)
    with preemption.peers_within(config.cluster_timeout, info):
        strategy = strategy if pipelined else strategies.create(config.strategy, virtual_cpus=config.virtual_cpus)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.global_batch_size(replicas)  # one micro-batch over all replicas
    accum = config.grad_accum_steps
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)

    resume_step = backup_cb.resume.step if backup_cb is not None and backup_cb.resume is not None else 0
    balanced = config.balance_batches  # every worker reads the whole global stream and slices it (tfpar.stragglers)
    readers = 1 if pipelined or balanced else info.num_workers  # a pipeline's one client (the chief) reads every batch
    pipes = data.make(config, global_batch, source, num_workers=readers,
                      worker_index=info.task_index if readers > 1 else 0,
                      micro_batches=accum, skip_batches=resume_step)  # resumes at the backup's exact example
    jit = False if pipelined else resolve_jit_compile(config.jit_compile, strategy)
    with strategy.scope():
        model = build_model(config)
        if pipelined:
            model = pipeline_driver.split(config, model, global_batch, print_fn=print_fn)
        optimizer, peak = make_optimizer(config, global_batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=make_loss(config),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      jit_compile=False, steps_per_execution=config.steps_per_execution)
    reduce_dtype = all_reduce.apply(model.optimizer, config.all_reduce_dtype, replicas)
    xla.enable(model, jit)  # per-replica XLA steps (tfpar/xla.py); Keras's own jit fails under strategies
    steps.accumulate(model, accum)  # one all-reduce per `accum` micro-batches; Keras's own fails under strategies
    bucket_mb = all_reduce.buckets(model, config.all_reduce_bucket_mb)  # overlap the backward pass; BN stats fused

    chief = info.is_chief
    model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", info.task_name)
    cbs, throughput = callbacks.for_run(config, model_dir, chief, global_batch * accum, pipes.val is not None,
                                        print_fn=print_fn, task_name=info.task_name,
                                        multi_worker=strategies.is_multi_worker(strategy))
    cbs.extend(extra_callbacks)
    if pipelined:
        cbs.extend(pipeline_driver.callbacks(config, model_dir))  # in a cluster, --profile_steps traces every task
    train_ds = pipes.train
    timing = _worker_times(config, model, strategy, global_batch, info, model_dir, print_fn if chief else None)
    if timing is not None:
        cbs.append(timing)
        if balanced:
            train_ds = stragglers.distribute(strategy, train_ds)
    if backup_cb is not None:
        if pipelined:
            backup_cb.io_device = pipeline_driver.io_device(config)  # remote stages' files on the chief's disk
        cbs.insert(0, backup_cb)  # first: it sets the initial epoch before the others begin
    name = strategies.describe(strategy)
    if pipelined:
        copies = f" ×{config.pipeline_replicas} copies" if config.pipeline_replicas > 1 else ""
        name = f"pipeline {config.stages} stages{copies}, {config.micro_batches} micro-batches ({config.schedule})"
    summed = f", gradients summed in {reduce_dtype}" if replicas > 1 else ""
    summed += f" in {bucket_mb:g} MiB buckets" if summed and bucket_mb else ""
    micro = f" x {accum} micro-batches per update" if accum > 1 else ""
    start_line = (f"{name}: global batch {global_batch}{micro}{summed}, precision {policy}, "
                  f"peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch")
    if print_fn and (chief or config.log_all_workers):
        print_fn(start_line)
    if chief and config.tensorboard:
        callbacks.write_text(model_dir, "run", start_line)
    try:
        lost_peer = pipeline_driver.stages_stay(config) if pipelined else preemption.peers_stay(
            info, config.cluster_timeout)
        with lost_peer:  # a peer lost mid-run: one line, exit 69
            history = model.fit(
                train_ds, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
                validation_data=pipes.val, validation_steps=pipes.validation_steps if pipes.val else None,
                callbacks=cbs, verbose=(config.verbose or 0) if (chief or config.log_all_workers) else 0,
                shuffle=False,  # the dataset shuffles itself
            )
            final = (model.evaluate(pipes.val, steps=pipes.validation_steps, return_dict=True, verbose=0)
                     if pipes.val is not None else {})
    except tf.errors.InvalidArgumentError as err:
        if "outside the valid range" in str(err):  # a label >= num_classes (or < 0) reached the loss
            raise ValueError(f"A label in {config.data!r} is outside [0, {config.num_classes}); "
                             f"check the data or --num_classes.") from None
        if "decode" in str(err).lower() or "image" in str(err).lower():
            first_line = str(err.message).strip().splitlines()[0]
            raise ValueError(f"An image in {config.data!r} could not be decoded ({first_line}).") from None
        raise
    hist = history.history
    last = lambda key: float(hist[key][-1]) if hist.get(key) else None  # noqa: E731
    return {
        "strategy": name,  # plain words; TF's class in strategy_class
        "strategy_class": strategies.public_class(strategy),
        "replicas": replicas,
        "precision": policy,
        "global_batch_size": global_batch,
        "examples_per_update": global_batch * accum,
        "learning_rate_peak": peak,
        "all_reduce_dtype": reduce_dtype,
        "all_reduce_bucket_mb": bucket_mb,
        "jit_compile": jit,
        "xla_steps": xla.state(model),
        "epochs_done": len(hist.get("loss", [])),
        "resumed_from": backup_cb.resumed if backup_cb is not None else None,
        "steps_done": sum(epoch["steps"] for epoch in throughput.epochs),
        "optimizer_updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "train_loss": last("loss"),
        "train_accuracy": last("accuracy"),
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": throughput.median_examples_per_sec(),
        "throughput": throughput.epochs,  # per epoch: examples_per_sec, step_time_ms, steps
        "weights_sha256": summary.weights_checksum(model),
        **({"pipeline": pipeline_driver.summary(config, model, model_dir)} if pipelined else {}),
        **({"worker_times": timing.report()} if timing is not None else {}),
    }


def _worker_times(config, model, strategy, global_batch, info, model_dir, print_fn):
    """``tfpar.stragglers``: the timed (and with balance_batches, sliced) step and its callback, or None."""
    from tfpar import stragglers

    reason = "pipeline stages time themselves (tfpar.pipeline)" if config.strategy == "pipeline" else \
        stragglers.supported(model)
    if reason and config.balance_batches:
        raise ValueError(f"balance_batches cannot be used here: {reason}.")
    if reason or not (config.worker_times or config.balance_batches):
        return None
    state = stragglers.enable(model, global_batch, balance=config.balance_batches)
    replicas = strategy.num_replicas_in_sync
    local = max(1, replicas // max(1, info.num_workers))
    if info.num_workers > 1:
        names = [f"worker {i // local}" + (f" replica {i % local}" if local > 1 else "") for i in range(replicas)]
    else:
        names = [f"replica {i}" for i in range(replicas)]
    return stragglers.WorkerTimes(
        state, names, every=config.balance_every,
        minimum=stragglers.minimum_share(global_batch, replicas, config.balance_min_fraction),
        log_dir=os.path.join(model_dir, "workers_timing") if config.tensorboard and info.is_chief else None,
        print_fn=print_fn)


def training_loop(strategy_name):
    """The function that trains under ``strategy_name``: a ``TRAINING_LOOPS`` entry or ``fit_loop``."""
    target = TRAINING_LOOPS.get(strategy_name)
    if target is None:
        if strategy_name in OWN_LOOP_STRATEGIES:
            raise ValueError(f"Strategy {strategy_name!r} needs its own training loop, which this build of tfpar lacks.")
        return fit_loop
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_model_dir(config):
    """One sentence, before anything is written, when model_dir is not writable or is another model's."""
    from tfpar import backup

    try:
        os.makedirs(config.model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=config.model_dir, prefix=".tfpar-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"model_dir {config.model_dir} is not writable ({err.strerror or err}).") from None
    backup.check_model_dir(config.model_dir, backup.signature(config))


def run(config, print_fn=print, callbacks=()):
    """Train as ``config`` says and return the summary (also written as JSON).

    Every process writes ``summary.<task>.json``; the chief also writes
    ``summary.json``. Both are written atomically. ``callbacks``: extra Keras
    callbacks for the ``fit`` strategies (the own-loop ones refuse them).
    """
    config.validate()
    from tfpar import cluster as cluster_lib

    info = cluster_lib.detect()  # fail on a bad TF_CONFIG before TF starts
    if config.strategy == "pipeline" and info.cluster_spec:
        from tfpar.pipeline import tasks as pipeline_tasks

        if pipeline_tasks.in_cluster(config, info):
            pipeline_tasks.check(config, info)  # a cluster shape the pipeline cannot use: one sentence
            if not info.is_chief:
                pipeline_tasks.serve(info, config.stages, print_fn=print_fn)  # exits once the chief is done
    _check_model_dir(config)
    started = time.time()
    loop = training_loop(config.strategy)
    if callbacks and loop is not fit_loop:
        raise ValueError(f"Extra Keras callbacks need a Keras fit strategy; {config.strategy} has its own loop.")
    result = loop(config, info, print_fn, extra_callbacks=callbacks) if callbacks else loop(config, info, print_fn)

    from tfpar import summary

    result = {
        "config": dataclasses.asdict(config),
        "task": info.task_name,
        "is_chief": info.is_chief,
        "num_workers": info.num_workers,
        "versions": summary.versions(),
        **result,
        "wall_time_sec": time.time() - started,
    }
    summary.write_json_atomic(os.path.join(config.model_dir, f"summary.{info.task_name}.json"), result)
    if info.is_chief:
        summary.write_json_atomic(os.path.join(config.model_dir, "summary.json"), result)
    return result
