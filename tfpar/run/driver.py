"""The training driver: ``TrainConfig`` -> ``run()`` -> summary dict (and summary.json).

Every strategy runs the same skeleton, ``train(hook)``: prepare (inspect the data, connect,
precision, seed, data) -> build (the recipe, compiled in the hook's scope) -> fit -> evaluate
-> summarize. What differs per strategy is the run's hook (``tfpar.run.hooks``), chosen
from ``HOOKS``; ``run()`` adds config, versions, task and wall time and writes the summaries.
"""

import contextlib
import dataclasses
import os
import tempfile
import time

from tfpar.run import data, recipe
from tfpar.run.config import DEFAULT_GLOBAL_BATCH, TrainConfig  # noqa: F401  (run() takes a TrainConfig)
from tfpar.run.hooks.dtensor import DTensor
from tfpar.run.hooks.keras_fit import KerasFit
from tfpar.run.hooks.parameter_server import ParameterServer
from tfpar.run.hooks.pipeline import Pipeline

# Strategy name -> the hook class a run of it gets: ``hook(config, cluster_info, print_fn)``.
HOOKS = {
    "auto": KerasFit, "one_device": KerasFit, "mirrored": KerasFit, "multi_worker": KerasFit, "tpu": KerasFit,
    "pipeline": Pipeline,
    "dtensor": DTensor,  # DESIGN item 5
    "parameter_server": ParameterServer,  # DESIGN items 4, 14
}


def hook_for(strategy_name):
    """The hook class of ``strategy_name``; one sentence when this build of tfpar has none."""
    hook = HOOKS.get(strategy_name)
    if hook is None:
        raise ValueError(f"Strategy {strategy_name!r} has no training hook in this build of tfpar.")
    return hook


def check_model_dir(config):
    """One sentence, before anything is written, when model_dir is not writable or is another model's."""
    from tfpar.runtime import backup

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
    A task that only serves the chief (pipeline stages, parameter-server
    workers and ps) serves until it is ended and returns nothing.
    """
    config.validate()
    from tfpar.core import summary
    from tfpar.runtime import cluster as cluster_lib

    info = cluster_lib.detect()  # fail on a bad TF_CONFIG before TF starts
    hook = hook_for(config.strategy)(config, info, print_fn)
    if callbacks and not hook.takes_callbacks:
        raise ValueError(f"Extra Keras callbacks need a Keras fit strategy; {config.strategy} has its own loop.")
    hook.check()  # e.g. a cluster shape the pipeline cannot use, a bad mesh: one sentence
    if hook.serves():
        return hook.serve()
    check_model_dir(config)
    from tfpar.parallel import fixes  # here, not at the top: importing the hook table must not import TensorFlow

    fixes.apply()  # every tfpar entry point: a user's keras.distribution is honoured, never silently ignored
    started = time.time()
    result = train(hook, callbacks)
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


def train(hook, extra_callbacks=()):
    """The skeleton: prepare -> build -> fit -> evaluate -> summarize, asking ``hook`` where strategies differ.

    Returns the run's fields of summary.json (``run`` adds config, versions, task and wall time).
    """
    config, info, print_fn = hook.config, hook.info, hook.print_fn

    # prepare
    source = data.inspect(config.data, config.num_classes, config.seed)  # before TF touches devices
    import keras

    from tfpar.run import callbacks
    from tfpar.runtime import precision

    hook.connect()
    global_batch = hook.global_batch()
    config = hook.config  # a resume on another worker count may cut the batch up otherwise (tfpar.runtime.elastic)
    remake = lambda: data.make(config, global_batch, source, **hook.reading())  # noqa: E731  (trials' own copy)

    def trial_model(policy, trial_pipes):  # --precision=auto --autotune: a model per policy, then dropped
        precision.apply(policy, hook.strategy)
        return build(hook, config, global_batch, trial_pipes)[0]

    policy = precision.apply(hook.tune_precision(remake, trial_model), hook.strategy)
    keras.utils.set_random_seed(config.seed)
    pipes = data.make(config, global_batch, source, **hook.reading())

    # build
    model, peak = build(hook, config, global_batch, pipes)
    hook.tune(model, pipes, remake)

    # fit, evaluate
    cbs = hook.callbacks(model, global_batch, pipes, extra_callbacks)
    lines = hook.start_lines(global_batch, policy, peak, pipes)
    if print_fn and hook.speaks:
        for line in lines:
            print_fn(line)
    if info.is_chief and config.tensorboard:
        callbacks.write_text(config.model_dir, "run", lines[-1])
    options = hook.fit_options(pipes)
    with _data_errors(config), hook.guard():
        history = model.fit(epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch, callbacks=cbs, **options)
        val = options["validation_data"]
        final = (model.evaluate(val, steps=options["validation_steps"], return_dict=True, verbose=0)
                 if val is not None else {})

    # summarize
    hist = history.history
    last = lambda key: float(hist[key][-1]) if hist.get(key) else None  # noqa: E731
    return {
        "strategy": hook.name(),  # plain words; TF's class in strategy_class
        "strategy_class": hook.strategy_class(),
        "replicas": hook.replicas,
        "precision": policy,
        "global_batch_size": global_batch,
        "learning_rate_peak": peak,
        "epochs_done": hook.epochs_before() + len(hist.get("loss", [])),  # the whole run's, across resumes
        "optimizer_updates": hook.optimizer_updates(model),
        "train_loss": last("loss"),
        "train_accuracy": last("accuracy"),
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "weights_sha256": hook.weights_sha256(model),
        **hook.summary(model, hist, pipes),
    }


def build(hook, config, global_batch, pipes):
    """The recipe's model, compiled in the hook's scope under the global dtype policy, step features installed.

    Returns ``(model, peak learning rate)``.
    """
    with hook.scope():
        model = hook.shaped(recipe.build_model(config), global_batch)
        optimizer, peak = recipe.make_optimizer(config, global_batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=recipe.make_loss(config), metrics=recipe.metrics(),
                      steps_per_execution=config.steps_per_execution, **hook.compile_options)
        hook.compiled(model)
    hook.install(model, global_batch)
    return model, peak


@contextlib.contextmanager
def _data_errors(config):
    """Around ``fit``: a bad label or image in the user's data becomes one sentence (``ValueError``)."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        if "outside the valid range" in str(err):  # a label >= num_classes (or < 0) reached the loss
            raise ValueError(f"A label in {config.data!r} is outside [0, {config.num_classes}); "
                             f"check the data or --num_classes.") from None
        if "decode" in str(err).lower() or "image" in str(err).lower():
            first_line = str(err.message).strip().splitlines()[0]
            raise ValueError(f"An image in {config.data!r} could not be decoded ({first_line}).") from None
        raise
