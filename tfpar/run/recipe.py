"""The model, optimizer, loss and metrics a ``TrainConfig`` asks for: made here once for every strategy."""


def metrics():
    """The compiled metrics of every tfpar-train run (summary.json's ``accuracy``)."""
    import keras

    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def make_optimizer(config, global_batch_size, steps_per_epoch):
    """The optimizer, with the scaled, warmed-up, decaying learning rate of ``tfpar.run.schedules``."""
    import keras

    from tfpar.run import schedules

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
    """``config.model`` from the registry, L2 on kernels unless AdamW decays decoupled.

    Settings a builder has no option for (``bn_momentum`` for ViT, which has
    no BatchNormalization) are left out; ``patch_size`` is passed when given.
    """
    from tfpar import models

    options = dict(
        num_classes=config.num_classes, input_shape=(config.image_size, config.image_size, 3),
        width_multiplier=config.width_multiplier, bn_momentum=config.bn_momentum,
        weight_decay=config.weight_decay if config.optimizer != "adamw" else 0.0,
    )
    if config.patch_size is not None:
        options["patch_size"] = config.patch_size
    accepted = models.options(config.model)
    return models.build(config.model, **{k: v for k, v in options.items() if k in accepted})
