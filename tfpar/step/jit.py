"""XLA for one replica's step: compile a stateless forward/backward, or run it uncompiled when XLA cannot.

Ops XLA cannot compile are found once per step kind at trace time (with
``experimental_get_compiler_ir``); that step then runs without XLA and one
warning names the layer and op. Why only this part is compiled: ``tfpar.step.xla``.
"""

import logging
import re
import threading
import warnings

import tensorflow as tf

log = logging.getLogger("tfpar")

# XLA error messages that mean "this graph cannot be compiled", as opposed to
# a shape error that the real run would also hit.
_UNCOMPILABLE = ("Detected unsupported operations", "must be a compile-time constant",
                 "is not supported by XLA", "No registered", "dynamic shape", "Unimplemented",
                 "`merge_call` called while defining a new graph")


def compiled_or_fallback(model, kind, pure, modes, warned):
    """``pure`` (a ``pieces.stateless`` function) XLA-compiled unless XLA cannot compile it.

    ``modes`` is the plan's step kind -> mode dict: a step XLA cannot compile
    is marked "fallback" there at its first trace (``warned`` holds the causes
    already warned about, one warning per cause).

    Layers update state in ``call`` (BatchNormalization's moving statistics,
    dropout seeds). Under a strategy such an update may all-reduce (tfpar's
    multi-worker compat makes BN statistics ``aggregation="mean"``), which
    cannot happen inside one replica's XLA function. So the compiled function
    only returns the new values; the caller assigns them outside XLA
    (``pieces.assign``), exactly as Keras would.
    """
    compiled = tf.function(pure, jit_compile=True, reduce_retracing=True)
    lock = threading.Lock()  # MirroredStrategy traces each replica in its own thread
    checked = set()

    def run(state, *args):
        with lock:
            if modes.get(kind) == "xla" and kind not in checked:
                reason = _why_not_compilable(pure, (state,) + args, model)
                checked.add(kind)
                if reason is not None:
                    modes[kind] = "fallback"
                    if reason not in warned:  # one warning per cause, not per train/test/predict
                        warned.add(reason)
                        warnings.warn(f"XLA cannot compile model {model.name!r}: {reason}. "
                                      f"Its {kind} step (and any other step using it) runs without XLA.",
                                      stacklevel=2)
            use_xla = modes.get(kind) == "xla"
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
