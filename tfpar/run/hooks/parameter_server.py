"""``ParameterServer``: ``--strategy=parameter_server``; the chief compiles and ``fit``s, workers and ps tasks serve.

Keras ``fit`` runs through the coordinator (``tfpar.kerasfix.ps_fit``, routed by
``tfpar.compat``): one asynchronous loop for tfpar-train and for users' Keras code. One step
is one batch on one worker. Progress is counted on the coordinator (DESIGN item 14), saved by
``parameter_server.checkpoints``, and printed as ``epoch N/E: loss=... steps=...``.
"""

import os

from tfpar.run.hooks.base import Hook


class ParameterServer(Hook):
    """``num_ps_shards``/``min_shard_bytes`` partition large variables (default: one shard per ps task
    for weights over 256 KiB); ``functools.partial`` them onto the class in ``driver.HOOKS``."""

    takes_callbacks = False  # its own loop, as far as users' callbacks go

    def __init__(self, config, info, print_fn=print, num_ps_shards=None, min_shard_bytes=None):
        super().__init__(config, info, print_fn)
        self.num_ps_shards, self.min_shard_bytes = num_ps_shards, min_shard_bytes
        self.saver = self.timer = None

    def serves(self):
        from tfpar.parallel import parameter_server

        return self.info.task_type in parameter_server.SERVING_TASKS

    def serve(self):
        from tfpar.parallel import parameter_server

        parameter_server.serve(self.info)  # blocks for good

    def connect(self):
        from tfpar.kerasfix import compat
        from tfpar.parallel import parameter_server

        self.strategy, _ = parameter_server.create(self.info, self.num_ps_shards, self.min_shard_bytes)
        if compat.PS_FIT not in compat.applied() and compat.ps_fit_needed():
            raise ValueError(f"Keras fit cannot train under ParameterServerStrategy while the compat fix "
                             f"{compat.PS_FIT} is disabled ({compat.DISABLE_ENV}); remove it from "
                             f"{compat.DISABLE_ENV}.")
        self.replicas = self.strategy.num_replicas_in_sync

    def global_batch(self):
        return self.config.global_batch_size(1)  # one step is one batch on one worker

    def name(self):
        from tfpar.runtime import strategies

        return strategies.describe(self.strategy, self.info)

    def callbacks(self, model, global_batch, pipes, extra):
        import keras

        from tfpar.kerasfix import ps_fit
        from tfpar.parallel import parameter_server
        from tfpar.run import callbacks

        config = self.config
        self.timer = ps_fit.timed_epochs()
        self.saver = parameter_server.checkpoints(os.path.join(config.model_dir, "checkpoints"))
        self.watch = _workers_watch(self.info, self.print_fn)
        cbs = [self.saver, self.timer, self.watch]
        if config.tensorboard:
            cbs.append(keras.callbacks.TensorBoard(log_dir=config.model_dir))
        if self.print_fn and config.verbose != 0:
            cbs.append(callbacks.StepsPrinter(self.print_fn, config.epochs))
        return cbs + list(extra)

    def start_lines(self, global_batch, policy, peak, pipes):
        return [f"{self.name()}: batch {global_batch} per step, "
                f"{self.config.steps_per_execution} step(s) per scheduled function, "
                f"precision {policy}, peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch"]

    def fit_options(self, pipes):
        val = pipes.val.take(pipes.validation_steps) if pipes.val is not None and pipes.validation_steps else pipes.val
        return dict(x=pipes.train, validation_data=val, validation_steps=None, verbose=0)  # StepsPrinter speaks

    def summary(self, model, history, pipes):
        import numpy as np

        from tfpar.kerasfix import ps_fit
        from tfpar.parallel import parameter_server

        steps_done = self.optimizer_updates(model)
        batch = self.global_batch()
        rates = [pipes.steps_per_epoch * batch / s for s in self.timer.seconds if s > 0]
        return {
            "num_ps": self.info.num_ps,
            "initial_epoch": self.saver.initial_epoch,
            "epochs_done": self.saver.initial_epoch + len(history.get("loss", [])),
            "steps_done": steps_done,
            "examples_seen": steps_done * batch,  # steps counted on the coordinator, resumed ones included
            "loss_history": [float(v) for v in history.get("loss", [])],
            "examples_per_sec": float(np.median(rates)) if rates else None,
            "epoch_examples_per_sec": rates,
            "staleness": ps_fit.mean_staleness(model),  # updates between a gradient's weights and its own update
            "variable_placement": parameter_server.variable_placement(model),
            "workers_lost": self.watch.lost,  # workers that took no connection at the end: trained without
        }


def _workers_watch(info, print_fn):
    """A callback that looks for lost workers after each epoch and at the end (``peers.unanswered``).

    The coordinator survives a lost worker by running its steps on the others; this makes
    the loss visible: one line per worker newly lost, and ``lost``, those still
    unreachable when training ended.
    """
    import keras

    from tfpar.runtime import peers

    workers = len(info.cluster_spec.get("worker", []))

    class WorkersWatch(keras.callbacks.Callback):
        lost, said = [], set()

        def _look(self):
            self.lost = peers.unanswered(info)
            for name in self.lost:
                if name not in self.said and print_fn:
                    print_fn(f"{name} is lost; training goes on with {workers - len(self.lost)} worker(s)")
                self.said = self.said | {name}

        def on_epoch_end(self, epoch, logs=None):
            self._look()

        def on_train_end(self, logs=None):
            self._look()

    return WorkersWatch()
