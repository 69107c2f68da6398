"""XLA (``jit_compile``) for Keras 3 under tf.distribute strategies.

Keras 3.15 compiles ``strategy.run(train_step)`` as one XLA function, so under
``MirroredStrategy`` XLA sees every replica's variables from one device and
fails ("Trying to access resource .../replica_1 located in device CPU:1 from
device CPU:0", keras-team/keras#21366); ``jit_compile="auto"`` therefore
turns XLA off under any strategy. Compiling the whole per-replica
``train_step`` does not work either: ``apply_gradients`` all-reduces across
replicas, which XLA cannot do from inside one replica.

What works (DESIGN.md item 15) is compiling only the per-replica forward and
backward pass and leaving the all-reduce, the optimizer update, the loss
tracker and the metrics outside XLA. ``enable(model)`` does exactly that: it
marks the step kinds to compile in the model's step plan, and
``tfpar.step.builder`` gives *this model instance* its own ``train_step`` /
``test_step`` / ``predict_step`` (Keras's default steps, split at the
gradient; ``tfpar.step.jit`` compiles the forward and backward); Keras's
outer ``jit_compile`` is turned off. Why this mechanism:

* Keras builds ``fit``/``evaluate``/``predict`` from ``self.train_step`` etc.,
  so the fit loop, callbacks, metrics and ``steps_per_execution`` stay Keras's.
* A class-level patch of ``TensorFlowTrainer._make_function`` cannot help on
  its own: the optimizer update inside ``train_step`` must still move out of
  the compiled region. Per-instance steps touch only the models asked for.
* No run-time subclassing of user models or optimizers. Models that define
  their own ``train_step`` keep it (one warning): tfpar cannot split it.
* ``LossScaleOptimizer.apply_gradients`` runs outside XLA, so float16 loss
  scaling skips non-finite steps and adjusts its scale exactly as without it.

Ops XLA cannot compile are found once per step kind at trace time (with
``experimental_get_compiler_ir``); that step then runs without XLA and one
warning names the layer and op. Shapes that change (a last partial batch) just
make XLA compile once more. Call ``enable`` again after every ``compile``;
its order with the other step features does not matter.
"""

import logging
import warnings

import tensorflow as tf

from tfpar.step import builder
from tfpar.step import plan as plans

log = logging.getLogger("tfpar")

MODES = ("auto", "on", "off")


def resolve(jit_compile="auto", strategy=None):
    """True when ``jit_compile`` ('auto'|'on'|'off', or a bool) means XLA here.

    ``auto`` is on for TPUs and GPUs and off for CPUs, where XLA was 3.5x
    slower than oneDNN for ResNet-50 (DESIGN.md item 11).
    """
    if isinstance(jit_compile, bool):
        return jit_compile
    if jit_compile not in MODES:
        raise ValueError(f"Unknown jit_compile {jit_compile!r}; choose one of: {', '.join(MODES)}.")
    if jit_compile != "auto":
        return jit_compile == "on"
    if strategy is not None and isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError, NotImplementedError):  # None or the default strategy
        devices = [d.name for d in tf.config.list_logical_devices()]
    return any(":GPU:" in d.upper() or ":TPU:" in d.upper() for d in devices)


def state(model):
    """What ``enable`` did to ``model``: {'train'|'test'|'predict': 'xla'|'fallback'|'custom'|'tpu'}."""
    return dict(plans.of(model).xla)


def enable(model, jit_compile="on"):
    """Run ``model``'s per-replica steps XLA-compiled; returns the resolved bool.

    Call after ``model.compile`` (inside or outside ``strategy.scope()``).
    ``jit_compile='off'`` undoes a previous ``enable``.
    """
    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.step.xla.enable needs a compiled model; call model.compile(...) first.")
    from keras.src.trainers.trainer import model_supports_jit

    strategy = model.distribute_strategy
    on = resolve(jit_compile, strategy)
    plan = plans.of(model)
    plan.xla = {}
    if on and not model_supports_jit(model):
        blockers = [layer.name for layer in model._flatten_layers() if not layer.supports_jit]
        warnings.warn(f"XLA left off for model {model.name!r}: layer(s) {', '.join(blockers) or '?'} "
                      f"declare supports_jit=False (or this platform has no XLA).", stacklevel=2)
        on = False
    if on and isinstance(strategy, tf.distribute.TPUStrategy):
        plan.xla = {kind: "tpu" for kind in builder.KINDS}  # TPUStrategy compiles the whole step with XLA already
    elif on:
        model.jit_compile = False  # Keras's own XLA wraps strategy.run: the cross-device failure
        for kind in builder.KINDS:
            if builder.defines_own(model, kind):
                warnings.warn(f"Model {model.name!r} defines its own {kind}_step; tfpar.step.xla leaves it uncompiled "
                              f"(wrap its forward/backward in tf.function(jit_compile=True) yourself).", stacklevel=2)
            plan.xla[kind] = "custom" if builder.defines_own(model, kind) else "xla"
        log.info("XLA on for the per-replica steps of %s under %s", model.name, type(strategy).__name__)
    else:
        model.jit_compile = False
    builder.install(model)
    return on
