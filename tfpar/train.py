"""The training driver: ``TrainConfig`` -> ``run()`` -> summary dict.

cluster -> strategy -> precision -> model -> data -> compile -> fit ->
evaluate -> summary.json. Each step calls the module that owns it.
"""

import dataclasses
import logging
import os
import tempfile
import time

log = logging.getLogger("tfpar")

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. ``validate()`` checks it once."""

    model: str = "resnet18"
    num_classes: int = 10
    image_size: int = 32
    width_multiplier: float = 1.0
    bn_momentum: float = 0.9
    strategy: str = "auto"
    virtual_cpus: int | None = None
    precision: str = "float32"
    data: str = "digits"
    batch_size: int = 64  # global
    epochs: int = 5
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    model_dir: str = "runs/default"
    tensorboard: bool = True
    seed: int = 0
    verbose: int = 2
    # fault tolerance (tfpar.backup / tfpar.preemption)
    backup_dir: str = ""  # default: model_dir/backup
    backup_freq: str = "epoch"  # "epoch", a number of steps, or "none"
    keep_backups: bool = False
    cluster_timeout: float = 300.0

    def validate(self):
        """Raise ``ValueError`` with one clear sentence for the first bad field."""
        from tfpar import models, precision, strategies

        if self.model not in models.names():
            raise ValueError(f"Unknown model {self.model!r}; choose one of: {', '.join(models.names())}.")
        if self.strategy not in strategies.NAMES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(strategies.NAMES)}.")
        if self.precision not in precision.POLICIES:
            raise ValueError(f"Unknown precision {self.precision!r}; choose one of: {', '.join(precision.POLICIES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        for name in ("num_classes", "image_size", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("steps_per_epoch", "validation_steps", "virtual_cpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer when given, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if self.data != "digits":
            raise ValueError(f"Unknown data source {self.data!r}; accepted: digits.")
        from tfpar import backup

        if self.backup_freq not in ("none", "off"):
            backup.parse_freq(self.backup_freq)
        if not self.cluster_timeout > 0:
            raise ValueError(f"cluster_timeout must be a positive number of seconds, got {self.cluster_timeout!r}.")
        if self.data == "digits" and self.num_classes != 10:
            raise ValueError(f"The digits data has 10 classes; num_classes={self.num_classes} does not match.")
        return self


def _optimizer(config):
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, momentum=config.momentum)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(config.learning_rate)
    return keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay or 0.004)


def _check_writable(model_dir):
    """One sentence, before training, when model_dir cannot be written."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".tfpar-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"model_dir {model_dir} is not writable ({err.strerror or err}).") from None


def run(config, print_fn=print):
    """Train as ``config`` says and return the summary (also written as JSON)."""
    config.validate()
    from tfpar import cluster as cluster_lib

    info = cluster_lib.detect()  # fail on a bad TF_CONFIG before TF starts

    import keras

    from tfpar import backup, callbacks, data, models, precision, preemption, strategies, summary

    started = time.time()
    # Fault tolerance: check model_dir and any backup before anything is written.
    _check_writable(config.model_dir)
    backup_cb = backup.for_run(config, info, print_fn=print_fn)
    with preemption.deadline(config.cluster_timeout if info.num_workers > 1 else None, info.task_name):
        strategy = strategies.create(config.strategy, virtual_cpus=config.virtual_cpus)
        preemption.barrier(strategy)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size {config.batch_size} does not divide evenly over {replicas} replicas; "
            f"use a multiple of {replicas}."
        )
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)

    (x_train, y_train), (x_val, y_val) = data.load_digits(config.image_size, seed=config.seed)
    train_ds = data.from_arrays(x_train, y_train, config.batch_size, training=True, seed=config.seed)
    val_ds = data.from_arrays(x_val, y_val, config.batch_size, training=False, drop_remainder=False)
    steps = config.steps_per_epoch or len(x_train) // config.batch_size
    if backup_cb is not None:
        train_ds = backup_cb.skip_completed(train_ds)

    with strategy.scope():
        model = models.build(
            config.model, num_classes=config.num_classes,
            input_shape=(config.image_size, config.image_size, 3),
            width_multiplier=config.width_multiplier, bn_momentum=config.bn_momentum,
            weight_decay=config.weight_decay if config.optimizer != "adamw" else 0.0,
        )
        model.compile(optimizer=_optimizer(config), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    chief = info.is_chief
    model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", info.task_name)
    throughput = callbacks.ThroughputLogger(
        config.batch_size, log_dir=os.path.join(model_dir, "train") if config.tensorboard else None,
        print_fn=print_fn if chief else None,
    )
    cbs = [throughput, keras.callbacks.TerminateOnNaN()]
    if backup_cb is not None:
        cbs.insert(0, backup_cb)  # first: it sets the initial epoch before the others begin
    if config.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(log_dir=model_dir))
    history = model.fit(
        train_ds, epochs=config.epochs, steps_per_epoch=steps, validation_data=val_ds,
        validation_steps=config.validation_steps, callbacks=cbs, verbose=config.verbose if chief else 0,
        shuffle=False,  # the dataset shuffles itself
    )
    final = model.evaluate(val_ds, steps=config.validation_steps, return_dict=True, verbose=0)

    result = {
        "config": dataclasses.asdict(config),
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "precision": policy,
        "task": info.task_name,
        "num_workers": info.num_workers,
        "versions": summary.versions(),
        "epochs_done": len(history.history.get("loss", [])),
        "resumed_from": backup_cb.resumed if backup_cb is not None else None,
        "steps_done": int(model.optimizer.iterations.numpy()),
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "val_loss": float(final["loss"]),
        "val_accuracy": float(final["accuracy"]),
        "examples_per_sec": throughput.median_examples_per_sec(),
        "wall_time_sec": time.time() - started,
        "weights_sha256": summary.weights_checksum(model),
    }
    summary.write_json_atomic(os.path.join(config.model_dir, f"summary.{info.task_name}.json"), result)
    if chief:
        summary.write_json_atomic(os.path.join(config.model_dir, "summary.json"), result)
    return result
