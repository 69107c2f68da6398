"""A functional Keras model as one flat list of operations, nested functional models opened up.

A keras-hub backbone, or a Keras application used as a layer, is one
operation of the model that holds it; a pipeline must cut between its
blocks, so ``flatten`` replaces every nested functional model by its own
operations (recursively) and ties its inputs and outputs to the outer
tensors. Every tensor gets one key; ``Segment`` runs a run of the
operations on values for the keys that enter it, calling each layer
exactly as Keras's functional ``call`` does (``training`` passed the same
way), so a segment shares the original layers and weights.
"""

import dataclasses

import keras
import tensorflow as tf

from tfpar.core import internals


@dataclasses.dataclass
class Op:
    """One layer or operation call: its node in its own (possibly nested) graph, and its tensors' keys."""

    layer: object
    node: object
    name: str  # unique in the flat graph: "block" or, where names repeat, "backbone/block"
    inputs: list  # keys of the tensors it reads
    outputs: list  # keys of the tensors it makes


@dataclasses.dataclass
class Graph:
    name: str
    ops: list
    inputs: list  # keys of the model inputs, in Keras's flat order
    input_struct: object  # the model's inputs structure (dict, list or one KerasTensor)
    outputs: list  # keys of the model outputs, flat
    output_struct: object
    specs: dict  # key -> KerasTensor (shape and dtype; sequence lengths filled in where the inputs fix them)
    nested: dict  # name of each opened-up nested model -> name of its last op

    def pack_outputs(self, values):
        flat = [values[k] for k in self.outputs]
        if isinstance(self.output_struct, (list, tuple)) and len(self.output_struct) == 1:
            return flat[0]  # as Keras's unpack_singleton
        return keras.tree.pack_sequence_as(self.output_struct, flat)

    def flat_inputs(self, x):
        """The model inputs as a flat list in key order, from the structure a user passes to ``fit``."""
        struct = self.input_struct
        if isinstance(x, dict) and not isinstance(struct, dict):
            names = [t.name for t in keras.tree.flatten(struct)]
            missing = [n for n in names if n not in x]
            if missing:
                raise ValueError(f"Model {self.name!r} takes inputs {names}, but the data has keys {sorted(x)}.")
            flat = [x[n] for n in names]
        elif isinstance(x, dict):
            if set(x) != set(struct):
                raise ValueError(f"Model {self.name!r} takes inputs {sorted(struct)}, but the data has keys {sorted(x)}.")
            flat = [x[k] for k in sorted(struct)]  # keras.tree.flatten's order for a dict
        else:
            flat = keras.tree.flatten(x)
        return [_cast(v, self.specs[k].dtype) for v, k in zip(flat, self.inputs)]


def example(spec, batch, fill=None, seed=0):
    """A made-up batch for one tensor: normal floats, ``fill`` (default ones) for integers; unknown sizes 8."""
    shape = (batch,) + tuple(8 if d is None else d for d in spec.shape[1:])
    dtype = tf.as_dtype(spec.dtype)
    if dtype.is_floating:
        return tf.cast(tf.random.stateless_normal(shape, seed=[seed, 0]), dtype)
    return tf.fill(shape, tf.cast(1 if fill is None else fill, dtype))


def _cast(value, dtype):
    value = tf.convert_to_tensor(value)
    return value if value.dtype == tf.as_dtype(dtype) else tf.cast(value, dtype)


def _is_functional(model):
    return isinstance(model, internals.get("functional_class"))


def _nodes(model):
    """The nodes of a functional model in Keras's own execution order (deepest first)."""
    by_depth = model._nodes_by_depth  # private: keras.src.ops.function.Function._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
            if node.operation is not None and not node.is_input]


def _nested_inputs(model, node):
    """The outer KerasTensors a nested model's node feeds to its inputs, in the model's flat input order."""
    if len(node.arguments.args) != 1 or any(
            isinstance(v, keras.KerasTensor) for v in keras.tree.flatten(node.arguments.kwargs)):
        return None
    given, struct = node.arguments.args[0], model._inputs_struct  # private: Functional._inputs_struct
    if isinstance(given, dict) and not isinstance(struct, dict):
        names = [t.name for t in keras.tree.flatten(struct)]
        return [given[n] for n in names] if all(n in given for n in names) else None
    flat = keras.tree.flatten(given)
    return flat if len(flat) == len(model.inputs) else None


def flatten(model):
    """``model`` (functional) as a ``Graph``: every nested functional model replaced by its operations."""
    alias, ops, nested = {}, [], {}

    def key(t):
        while id(t) in alias:
            t = alias[id(t)]
        return id(t)

    def walk(fn, path):
        for node in _nodes(fn):
            layer = node.operation
            once = len(getattr(layer, "_inbound_nodes", ())) == 1  # a model called twice stays one op (refused)
            feeds = _nested_inputs(layer, node) if _is_functional(layer) and once else None
            if feeds is not None:
                for inner, outer in zip(layer.inputs, feeds):
                    alias[id(inner)] = outer
                walk(layer, path + [layer.name])
                for outer, inner in zip(node.outputs, layer.outputs):
                    alias[id(outer)] = inner
                if ops:
                    nested[layer.name] = ops[-1]
                continue
            ops.append(Op(layer, node, path + [layer.name], [], []))  # keys once every alias is known

    walk(model, [])
    counts = {}
    for op in ops:
        counts[op.name[-1]] = counts.get(op.name[-1], 0) + 1
    for op in ops:
        op.outputs = [key(t) for t in op.node.outputs]
        op.inputs = [key(t) for t in op.node.input_tensors]
        op.name = op.name[-1] if counts[op.name[-1]] == 1 else "/".join(op.name)
    graph = Graph(model.name, ops, [key(t) for t in model.inputs], model._inputs_struct,
                  [key(t) for t in model.outputs], model._outputs_struct, {}, {k: v.name for k, v in nested.items()})
    graph.specs = _specs(graph, model, key)
    return graph


def _specs(graph, model, key):
    """Each key's KerasTensor; re-derived through the ops where an inner graph left a dimension unknown."""
    specs = {key(t): t for t in model.inputs}
    for op in graph.ops:
        for k, t in zip(op.outputs, op.node.outputs):
            specs[k] = t
    if all(None not in tuple(t.shape)[1:] for t in specs.values()):
        return specs
    for op in graph.ops:  # a nested backbone's tensors are (None, None, d) even when the outer inputs fix length
        local = {id(t): specs[k] for t, k in zip(op.node.input_tensors, op.inputs)}
        args, kwargs = op.node.arguments.fill_in(local)  # private: SymbolicArguments.fill_in
        try:
            out = op.layer.compute_output_spec(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a layer that cannot say its shape keeps the graph's own
            continue
        for k, t in zip(op.outputs, keras.tree.flatten(out)):
            specs[k] = t
    return specs


class Segment:
    """Consecutive ops of a ``Graph`` as a callable: values for ``inputs`` in, values for ``outputs`` out.

    The first segment takes the model's inputs as the user passes them
    (a dict, a list or one tensor); the last returns the model's outputs
    in the model's structure; between, a segment takes and returns a tuple
    of tensors, one per key that crosses the cut.
    """

    def __init__(self, graph, ops, inputs, outputs, name, first=False, last=False):
        self.graph, self.ops, self.name = graph, list(ops), name
        self.inputs, self.outputs, self.first, self.last = list(inputs), list(outputs), first, last
        self.layers = [op.layer for op in self.ops]

    @tf.autograph.experimental.do_not_convert
    def __call__(self, x, training=False):
        flat = self.graph.flat_inputs(x) if self.first else list(x)
        values = dict(zip(self.inputs, flat))
        call_with = internals.get("functional_operation_fn")
        for op in self.ops:
            local = {id(t): values[k] for t, k in zip(op.node.input_tensors, op.inputs)}
            args, kwargs = op.node.arguments.fill_in(local)  # private: SymbolicArguments.fill_in
            out = call_with(op.layer, training=training)(*args, **kwargs)
            for k, value in zip(op.outputs, keras.tree.flatten(out)):
                values[k] = value
        if self.last:
            return self.graph.pack_outputs(values)
        return tuple(values[k] for k in self.outputs)

    def _unique(self, attribute):
        seen, found = set(), []
        for layer in self.layers:
            for v in getattr(layer, attribute, ()):
                if id(v) not in seen:
                    seen.add(id(v))
                    found.append(v)
        return found

    @property
    def trainable_weights(self):
        return self._unique("trainable_weights")

    @property
    def variables(self):
        return self._unique("variables")

    @property
    def weights(self):  # as on a Keras layer: every weight, trainable or not
        return self._unique("weights")

    @property
    def non_trainable_variables(self):
        return self._unique("non_trainable_variables")

    @property
    def losses(self):
        return [loss for layer in self.layers if isinstance(layer, keras.layers.Layer) for loss in layer.losses]
