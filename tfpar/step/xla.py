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
tracker and the metrics outside XLA. ``enable(model)`` does exactly that by
giving *this model instance* its own ``train_step`` / ``test_step`` /
``predict_step`` (Keras's default steps, split at the gradient) and turning
Keras's outer ``jit_compile`` off. Why this mechanism:

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
make XLA compile once more. Call ``enable`` again after every ``compile``.
"""

import logging
import re
import threading
import warnings

import tensorflow as tf

from tfpar.step import steps

log = logging.getLogger("tfpar")

MODES = ("auto", "on", "off")

# XLA error messages that mean "this graph cannot be compiled", as opposed to
# a shape error that the real run would also hit.
_UNCOMPILABLE = ("Detected unsupported operations", "must be a compile-time constant",
                 "is not supported by XLA", "No registered", "dynamic shape", "Unimplemented",
                 "`merge_call` called while defining a new graph")


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
    """What ``enable`` did to ``model``: {'train'|'test'|'predict': 'xla'|'fallback'|...}."""
    return dict(getattr(model, "_tfpar_xla", {}))


def enable(model, jit_compile="on"):
    """Run ``model``'s per-replica steps XLA-compiled; returns the resolved bool.

    Call after ``model.compile`` (inside or outside ``strategy.scope()``).
    ``jit_compile='off'`` undoes a previous ``enable``.
    """
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from keras.src.trainers.trainer import model_supports_jit

    if not getattr(model, "compiled", False):
        raise ValueError("tfpar.xla.enable needs a compiled model; call model.compile(...) first.")
    strategy = model.distribute_strategy
    on = resolve(jit_compile, strategy)
    _disable(model)
    if on and not model_supports_jit(model):
        blockers = [layer.name for layer in model._flatten_layers() if not layer.supports_jit]
        warnings.warn(f"XLA left off for model {model.name!r}: layer(s) {', '.join(blockers) or '?'} "
                      f"declare supports_jit=False (or this platform has no XLA).", stacklevel=2)
        on = False
    if not on:
        model.jit_compile = False
        return False
    if isinstance(strategy, tf.distribute.TPUStrategy):
        # TPUStrategy compiles the whole step with XLA already.
        model._tfpar_xla = {"train": "tpu", "test": "tpu", "predict": "tpu"}
        return True
    model.jit_compile = False  # Keras's own XLA wraps strategy.run: the cross-device failure
    model._tfpar_xla = {}
    warned = set()
    makers = {"train": _train_step, "test": _test_step, "predict": _predict_step}
    for kind, make in makers.items():
        name = f"{kind}_step"
        if getattr(type(model), name) is not getattr(TensorFlowTrainer, name):
            warnings.warn(f"Model {model.name!r} defines its own {name}; tfpar.xla leaves it uncompiled "
                          f"(wrap its forward/backward in tf.function(jit_compile=True) yourself).", stacklevel=2)
            model._tfpar_xla[kind] = "custom"
            continue
        setattr(model, name, make(model, warned))
        model._tfpar_xla[kind] = "xla"
    model.train_function = model.test_function = model.predict_function = None
    log.info("XLA on for the per-replica steps of %s under %s", model.name, type(strategy).__name__)
    return True


def _disable(model):
    for kind in getattr(model, "_tfpar_xla", {}):
        model.__dict__.pop(f"{kind}_step", None)
    model._tfpar_xla = {}
    model.train_function = model.test_function = model.predict_function = None
    steps.install(model)  # keep gradient accumulation and buckets, without XLA


def _train_step(model, warned):
    """Keras 3.15's ``train_step`` with the tape part XLA-compiled per replica (and per micro-batch)."""
    return steps.train_step(model, _compiled_or_fallback(model, "train", steps.forward_backward(model), warned))


def _assigning(model, step_fn):
    """``step_fn(state, *args)`` as a plain ``fn(*args)`` that assigns its updates (test and predict steps)."""

    def run(*args):
        result, updates = step_fn(steps.state_of(model), *args)
        steps.assign(model, updates)
        return result

    return run


def _test_step(model, warned):
    from keras.src.losses import loss as loss_module

    def forward(x, y, sample_weight):
        y_pred = steps.call(model, x, training=False)
        loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        return loss, y_pred

    step_fn = _assigning(model, _compiled_or_fallback(model, "test", steps.stateless(model, forward), warned))

    def test_step(data):
        x, y, sample_weight = steps.unpack(data)
        loss, y_pred = step_fn(x, y, sample_weight)
        model._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss), sample_weight=steps.batch_size(x))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return test_step


def _predict_step(model, warned):
    predict = steps.stateless(model, lambda x: steps.call(model, x, training=False))
    step_fn = _assigning(model, _compiled_or_fallback(model, "predict", predict, warned))

    def predict_step(data):
        x, _, _ = steps.unpack(data)
        return step_fn(x)

    return predict_step


def _compiled_or_fallback(model, kind, pure, warned):
    """``pure`` (a ``steps.stateless`` function) XLA-compiled unless XLA cannot compile it.

    Layers update state in ``call`` (BatchNormalization's moving statistics,
    dropout seeds). Under a strategy such an update may all-reduce (tfpar's
    multi-worker compat makes BN statistics ``aggregation="mean"``), which
    cannot happen inside one replica's XLA function. So the compiled function
    only returns the new values; the caller assigns them outside XLA
    (``steps.assign``), exactly as Keras would.
    """
    compiled = tf.function(pure, jit_compile=True, reduce_retracing=True)
    lock = threading.Lock()  # MirroredStrategy traces each replica in its own thread
    checked = set()

    def run(state, *args):
        with lock:
            if model._tfpar_xla.get(kind) == "xla" and kind not in checked:
                reason = _why_not_compilable(pure, (state,) + args, model)
                checked.add(kind)
                if reason is not None:
                    model._tfpar_xla[kind] = "fallback"
                    if reason not in warned:  # one warning per cause, not per train/test/predict
                        warned.add(reason)
                        warnings.warn(f"XLA cannot compile model {model.name!r}: {reason}. "
                                      f"Its {kind} step (and any other step using it) runs without XLA.",
                                      stacklevel=2)
            use_xla = model._tfpar_xla.get(kind) == "xla"
        return compiled(state, *args) if use_xla else pure(state, *args)

    return run


def _why_not_compilable(fn, args, model):
    """None if XLA lowers ``fn`` for ``args``'s shapes, else which layer/op it cannot."""
    # experimental_get_compiler_ir takes only TensorSpecs, so the probe closes
    # over everything in ``args`` that is not a tensor (e.g. sample_weight=None).
    leaves = tf.nest.flatten(args)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, tf.Tensor)]

    def probe(*tensors):
        filled = list(leaves)
        for i, tensor in zip(where, tensors):
            filled[i] = tensor
        return fn(*tf.nest.pack_sequence_as(args, filled))

    # The HLO probe needs static shapes; an unknown (batch) size does not
    # change which ops the step uses, so any size will do.
    if any(leaves[i].shape.rank is None for i in where):
        return None
    specs = [tf.TensorSpec([1 if d is None else d for d in leaves[i].shape], leaves[i].dtype) for i in where]
    try:
        tf.function(probe, jit_compile=True).experimental_get_compiler_ir(*specs)(stage="hlo")
    except Exception as err:  # noqa: BLE001 - TF raises several types here; classified below
        message = str(err)
        if not any(marker in message for marker in _UNCOMPILABLE):
            log.debug("XLA pre-check inconclusive (%s); compiling anyway", message.splitlines()[0])
            return None
        node = re.search(r"\{\{node ([^}]+)\}\}", message)
        if node:
            return f"{_layer_of(node.group(1), model)} uses op {node.group(1).rpartition('/')[2]}, which XLA does not support"
        layer = re.search(r"when calling (\w+)\.call\(\)", message)
        if "merge_call" in message:
            where = f"layer class {layer.group(1)}" if layer else "a layer"
            return f"{where} synchronizes replicas inside its call (e.g. synchronized=True)"
        return message.splitlines()[0][:300]
    return None


def _layer_of(node_name, model):
    """The Keras layer a graph node belongs to ('model_1/conv_3/Op' -> layer 'conv')."""
    names = {layer.name for layer in model._flatten_layers()}
    for part in reversed(node_name.split("/")[:-1]):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in names:
                return f"layer {candidate!r}"
    return f"the op at {node_name!r}"
