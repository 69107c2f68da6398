"""``Hook``: the points where a strategy changes the driver's skeleton, with their defaults.

A hook is made for one run (``Hook(config, info, print_fn)``) and keeps that run's state
(strategy, callbacks it made, connections), so nothing outlives the run. ``tfpar.run.driver``
calls the methods below in the order they are listed (``run``: up to ``serve``; ``train``: the rest).
"""

import contextlib
import os


class Hook:
    """Defaults: Keras ``fit`` under ``self.strategy`` with tfpar's callbacks (``tfpar.run.callbacks``)."""

    takes_callbacks = True  # users' extra Keras callbacks are welcome (``run(callbacks=...)``)
    compile_options = {}  # extra ``model.compile`` arguments

    def __init__(self, config, info, print_fn=print):
        self.config, self.info, self.print_fn = config, info, print_fn
        self.strategy = None  # a tf.distribute.Strategy once ``connect`` made it
        self.replicas = 1
        self.throughput = None  # the ThroughputLogger ``callbacks`` made
        chief = info.is_chief
        self.speaks = chief or config.log_all_workers
        self.model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", info.task_name)

    # -- before anything is written
    def check(self):
        """One sentence (``ValueError``) for what this strategy cannot run, before the model_dir is touched."""

    def serves(self):
        """Whether this task only serves the chief (then ``serve`` is all it does)."""
        return False

    def serve(self):
        """Serve the chief until it is done; blocks or exits the process."""
        raise NotImplementedError

    # -- prepare
    def connect(self):
        """Make the strategy, mesh or cluster connection; set ``self.strategy`` and ``self.replicas``."""
        raise NotImplementedError

    def global_batch(self):
        """Examples per step over all replicas."""
        return self.config.global_batch_size(self.replicas)

    def reading(self):
        """Extra ``tfpar.run.data.make`` arguments: which part of the stream this process reads."""
        return {}

    # -- build
    def tune_precision(self, remake, trial_model):
        """The precision policy to build the run's model in: the config's, or what ``--autotune`` timed fastest.

        ``trial_model(policy, pipes)`` builds and installs a model for one trial; ``remake()`` makes pipelines.
        """
        return self.config.precision

    def scope(self):
        """The scope the model is built and compiled in."""
        return self.strategy.scope()

    def shaped(self, model, global_batch):
        """The model to compile, from the recipe's model (inside ``scope``)."""
        return model

    def compiled(self, model):
        """After ``compile``, still inside ``scope``."""

    def install(self, model, global_batch):
        """After ``compile``, outside ``scope``: the step installers, layouts."""

    def tune(self, model, pipes, remake):
        """After ``install``: ``--autotune``'s trials, which leave the model's state as they found it.

        ``remake()`` builds the pipelines again, for trials that must not touch the run's own.
        """

    # -- fit
    def callbacks(self, model, global_batch, pipes, extra):
        """The Keras callbacks ``fit`` gets, ``extra`` (the caller's) included."""
        from tfpar.run import callbacks

        cbs, self.throughput = callbacks.for_run(
            self.config, self.model_dir, self.info.is_chief, global_batch, pipes.val is not None,
            print_fn=self.print_fn, task_name=self.info.task_name)
        return cbs + list(extra)

    def name(self):
        """The strategy in plain words (summary.json's ``strategy``)."""
        from tfpar.runtime import strategies

        return strategies.describe(self.strategy)

    def strategy_class(self):
        """TF's public class of the strategy (summary.json's ``strategy_class``)."""
        from tfpar.runtime import strategies

        return strategies.public_class(self.strategy)

    def start_lines(self, global_batch, policy, peak, pipes):
        """The lines printed before ``fit``; the last one is also kept in TensorBoard."""
        raise NotImplementedError

    def fit_options(self, pipes):
        """``fit``'s data and verbosity; ``evaluate`` reads ``validation_data``/``validation_steps``."""
        config = self.config
        return dict(x=pipes.train, validation_data=pipes.val,
                    validation_steps=pipes.validation_steps if pipes.val else None,
                    verbose=(config.verbose or 0) if self.speaks else 0,
                    shuffle=False)  # the dataset shuffles itself

    def guard(self):
        """Around ``fit`` and ``evaluate``: what a lost peer does."""
        return contextlib.nullcontext()

    # -- summarize
    def epochs_before(self):
        """Epochs a resumed run had done before it started (summary.json's ``epochs_done`` counts them)."""
        return 0

    def optimizer_updates(self, model):
        import keras

        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    def weights_sha256(self, model):
        from tfpar.core import summary

        return summary.weights_checksum(model)

    def summary(self, model, history, pipes):
        """This strategy's summary.json fields beyond the skeleton's (they may replace the skeleton's).

        ``history`` is ``fit``'s ``History.history`` dict.
        """
        steps = sum(epoch["steps"] for epoch in self.throughput.epochs)
        return {
            "jit_compile": False,
            "steps_done": steps,
            "examples_per_sec": self.throughput.median_examples_per_sec(),
            "examples_seen": steps * self.global_batch(),  # this run's; KerasFit counts a resumed run's too
        }
