"""``tfpar-train --strategy=parameter_server``: the chief compiles and ``fit``s; workers and ps tasks serve."""

import os
import time

import numpy as np

from tfpar.parallel import parameter_server


def epoch_printer(print_fn, epochs):
    """A callback printing ``epoch N/E: loss=... steps=...`` after each epoch (tfpar-train's line)."""
    import keras

    class EpochPrinter(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
            print_fn(f"epoch {epoch + 1}/{epochs}: {shown} steps={steps} "
                     f"({time.perf_counter() - self._started:.1f}s)")

    return EpochPrinter()




def run_config(config, cluster_info, print_fn=print, num_ps_shards=None, min_shard_bytes=None):
    """``tfpar.train``'s training loop for ``strategy='parameter_server'``.

    Worker and ps tasks block in ``serve()``. The chief compiles the model
    under the strategy and trains it with Keras's own ``model.fit``, which
    ``tfpar.compat`` runs through the coordinator (``tfpar.ps_fit``): one
    asynchronous loop for tfpar-train and for users' Keras code. It returns
    the loop fields ``tfpar.train.run`` expects (strategy, replicas,
    precision, epochs_done, steps_done, losses, accuracies,
    examples_per_sec, weights_sha256) plus ``num_ps``, ``initial_epoch``,
    ``loss_history`` and ``variable_placement``; ``run`` adds config,
    versions, task and wall time and writes ``summary.json``.
    ``num_ps_shards``/``min_shard_bytes`` partition large variables (default:
    one shard per ps task for weights over 256 KiB).
    """
    if cluster_info.task_type in parameter_server.SERVING_TASKS:
        parameter_server.serve(cluster_info)
        return None
    if config.grad_accum_steps > 1:
        raise ValueError("parameter_server training runs one batch per step; use grad_accum_steps=1.")
    from tfpar.run import data

    source = data.inspect(config.data, config.num_classes, config.seed)

    import keras

    from tfpar.kerasfix import compat, ps_fit
    from tfpar.runtime import precision, strategies
    from tfpar.core import summary
    from tfpar.run import recipe as train_lib

    strategy, _ = parameter_server.create(cluster_info, num_ps_shards, min_shard_bytes)
    if compat.PS_FIT not in compat.applied() and compat.ps_fit_needed():
        raise ValueError(f"Keras fit cannot train under ParameterServerStrategy while the compat fix {compat.PS_FIT} "
                         f"is disabled ({compat.DISABLE_ENV}); remove it from {compat.DISABLE_ENV}.")
    policy = precision.apply(config.precision, strategy)
    keras.utils.set_random_seed(config.seed)
    batch = config.global_batch_size(1)  # one step is one batch on one worker
    pipes = data.make(config, batch, source)
    with strategy.scope():
        model = train_lib.build_model(config)
        optimizer, peak = train_lib.make_optimizer(config, batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=train_lib.make_loss(config),
                      metrics=train_lib.metrics(),
                      steps_per_execution=config.steps_per_execution)
    val = pipes.val.take(pipes.validation_steps) if pipes.val is not None and pipes.validation_steps else pipes.val
    if print_fn:
        print_fn(f"{strategies.describe(strategy, cluster_info)}: batch {batch} per step, "
                 f"{config.steps_per_execution} step(s) per scheduled function, "
                 f"precision {policy}, peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch")

    timer = ps_fit.timed_epochs()
    saver = parameter_server.checkpoints(os.path.join(config.model_dir, "checkpoints"))
    callbacks = [saver, timer]
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=config.model_dir))
    if print_fn and config.verbose != 0:
        callbacks.append(epoch_printer(print_fn, config.epochs))
    history = model.fit(pipes.train, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
                        validation_data=val, callbacks=callbacks, verbose=0)
    hist = history.history
    final = model.evaluate(val, return_dict=True, verbose=0) if val is not None else {}
    steps_done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    rates = [pipes.steps_per_epoch * batch / s for s in timer.seconds if s > 0]
    epochs_run = len(hist.get("loss", []))
    return {
        "strategy": strategies.describe(strategy, cluster_info),
        "strategy_class": strategies.public_class(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "precision": policy,
        "global_batch_size": batch,
        "learning_rate_peak": peak,
        "num_ps": cluster_info.num_ps,
        "initial_epoch": saver.initial_epoch,
        "epochs_done": saver.initial_epoch + epochs_run,
        "steps_done": steps_done,
        "optimizer_updates": steps_done,
        "train_loss": float(hist["loss"][-1]) if hist.get("loss") else None,
        "train_accuracy": float(hist["accuracy"][-1]) if hist.get("accuracy") else None,
        "loss_history": [float(v) for v in hist.get("loss", [])],
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": float(np.median(rates)) if rates else None,
        "epoch_examples_per_sec": rates,
        "staleness": ps_fit.mean_staleness(model),  # updates between a gradient's weights and its own update
        "weights_sha256": summary.weights_checksum(model),
        "variable_placement": parameter_server.variable_placement(model),
    }
