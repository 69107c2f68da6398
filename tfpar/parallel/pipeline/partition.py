"""Cutting a functional (or Sequential) Keras model into consecutive stages.

The model is first flattened (``graph``): nested functional models, such as
a keras-hub backbone or a Keras application used as a layer, are opened up,
so stages can fall between their blocks. A cut is a place in the ops' order
where exactly one activation crosses, the output of the op just before it;
tensors that no weight has touched (the inputs, a padding mask, token
positions) and finished model outputs may cross too, and are sent forward
with it. So AlexNet and VGG can be cut between any layers, ResNet only
between residual blocks (inside a block the shortcut and the branch both
cross), and a transformer between its blocks, each cut carrying the hidden
states and the mask. Stages run the original layers, so weights are shared.
"""

import dataclasses
import logging

import keras

from tfpar.core import internals
from tfpar.parallel.pipeline import graph as graph_lib

log = logging.getLogger("tfpar")


@dataclasses.dataclass
class Unit:
    """The ops between two neighbouring cuts: the smallest piece a stage can hold."""

    graph: object  # the flat graph (graph.Graph)
    ops: list  # graph.Op, in order
    input: list  # keys of the tensors entering the unit (the model inputs for the first one)
    output: list  # keys of the tensors leaving it (the model outputs for the last one)

    @property
    def layers(self):
        return [op.layer for op in self.ops]

    @property
    def names(self):
        return [op.name for op in self.ops]


def _graph(model):
    """``model`` as a flat ``graph.Graph``; one sentence for a model tfpar cannot cut."""
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(f"Sequential model {model.name!r} must be built with an Input before it can be split.")
        model = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers, as a graph
    elif not isinstance(model, keras.Model) or not hasattr(model, "operations") or not graph_lib._is_functional(model):
        raise ValueError(f"Model {getattr(model, 'name', model)!r} is subclassed and has no layer graph to cut; "
                         f"tfpar.pipeline.split accepts functional and Sequential Keras models.")
    flat = graph_lib.flatten(model)
    for op in flat.ops:
        if len(getattr(op.layer, "_inbound_nodes", ())) > 1:
            raise ValueError(f"Layer {op.name!r} is called more than once in {model.name!r} (shared or tied "
                             f"weights); tfpar.pipeline.split accepts models whose layers are each called once.")
    return flat


def units(model):
    """``model`` cut at every place where one activation crosses: a list of ``Unit``.

    Raises ``ValueError`` for a subclassed model or a graph tfpar cannot cut.
    """
    g = _graph(model)
    ops, end = g.ops, len(g.ops)
    producer, order, learned = {}, [], {}
    for k in g.inputs:
        producer[k], learned[k] = -1, False
        order.append(k)
    for i, op in enumerate(ops):
        touched = bool(getattr(op.layer, "weights", None)) or any(learned.get(k, False) for k in op.inputs)
        for k in op.outputs:
            producer[k], learned[k] = i, touched
            order.append(k)
    read_by = {}  # the last op that reads each tensor
    for i, op in enumerate(ops):
        for k in op.inputs:
            read_by[k] = max(read_by.get(k, -1), i)
    last_use = dict(read_by)
    for k in g.outputs:
        last_use[k] = end
    result, start, entering = [], 0, list(g.inputs)
    for i in range(end - 1):
        crossing = [k for k in dict.fromkeys(order) if producer[k] <= i < last_use.get(k, -1)]
        active = [k for k in crossing if learned[k] and read_by.get(k, -1) > i]  # a finished output rides along
        if len(active) == 1 and producer[active[0]] == i:
            result.append(Unit(g, ops[start:i + 1], entering, crossing))
            start, entering = i + 1, crossing
    result.append(Unit(g, ops[start:], entering, list(g.outputs)))
    return result


def cut_names(unit_list):
    """The layer names after which a stage may end: each unit's last layer but the final one."""
    return [u.ops[-1].name for u in unit_list[:-1]]


def _where(name, unit_list):
    """Why ``name`` is not a cut point: the sentence's middle."""
    ops = [op for u in unit_list for op in u.ops]
    if any(op.name == name for op in ops):
        return "is not a cut point (more than one activation crosses there, e.g. inside a residual block)"
    flatten_layers = internals.get("flatten_layers")
    for op in ops:
        if isinstance(op.layer, keras.layers.Layer):
            if any(inner.name == name for inner in flatten_layers(op.layer, include_self=False)):
                return (f"is inside layer {op.name!r}, which runs as one piece (a stage cannot split an attention "
                        f"layer's internals)")
    return "is not a layer of the model"


def groups_from_names(unit_list, names, model=None):
    """Unit counts per stage for a list of cut-layer names (stages end after each named layer).

    A nested model's name (e.g. a backbone's) stands for its last layer.
    """
    allowed = cut_names(unit_list)
    nested = unit_list[0].graph.nested
    bounds = []
    for name in names:
        name = nested.get(name, name) if name not in allowed else name
        if name not in allowed:
            raise ValueError(f"Cut layer {name!r} {_where(name, unit_list)}; cut after one of: {', '.join(allowed)}.")
        bounds.append(allowed.index(name) + 1)
    if bounds != sorted(set(bounds)):
        raise ValueError(f"Cut layers {list(names)} must be distinct and in model order.")
    edges = [0] + bounds + [len(unit_list)]
    return [b - a for a, b in zip(edges, edges[1:])]


def stage_models(unit_list, counts, name="stage"):
    """One ``graph.Segment`` per stage, holding ``counts[s]`` consecutive units; layers are shared."""
    models, start = [], 0
    for s, count in enumerate(counts):
        chunk = unit_list[start:start + count]
        models.append(graph_lib.Segment(chunk[0].graph, [op for u in chunk for op in u.ops], chunk[0].input,
                                        chunk[-1].output, f"{name}{s}", first=start == 0,
                                        last=start + count == len(unit_list)))
        start += count
    return models


def check_per_example(stage_list, devices, name):
    """One sentence (``ValueError``) if an example's outputs change with the other examples of its batch.

    A pipeline runs each micro-batch on its own, so such a model would train as
    another model. Runs the stages in turn on their devices in inference mode,
    where BatchNormalization uses its moving statistics (in training it
    normalises each micro-batch by itself, which is allowed: see docs/pipeline.md),
    on 4 made-up examples, then with examples 2-3 replaced, and compares 0-1.
    """
    import numpy as np
    import tensorflow as tf

    g = stage_list[0].graph
    specs = [g.specs[k] for k in g.inputs]
    runs = []
    for seed, fill in ((1, 1), (2, 0)):
        xs = [tf.concat([graph_lib.example(spec, 2, seed=0)[:2], graph_lib.example(spec, 2, fill, seed)], 0)
              for spec in specs]
        x = keras.tree.pack_sequence_as(g.input_struct, xs) if not isinstance(g.input_struct, dict) else \
            dict(zip(sorted(g.input_struct), xs))
        try:
            for stage, device in zip(stage_list, devices):
                with tf.device(device):
                    x = stage(x, training=False)
        except Exception as err:  # noqa: BLE001 - made-up sizes a model cannot take (e.g. 8 px for 5 poolings)
            if all(None not in tuple(spec.shape)[1:] for spec in specs):
                raise
            log.info("pipeline: per-example check skipped (the inputs' sizes are not fixed: %s)", err)
            return
        runs.append([np.asarray(tf.cast(y, tf.float32))[:2] for y in keras.tree.flatten(x)
                     if len(y.shape) and y.shape[0] == 4 and (y.dtype.is_floating or y.dtype.is_integer)])
    made_by = {k: op.name for op in g.ops for k in op.outputs}
    flat = [made_by.get(k, "input") for k in g.outputs]
    for i, (a, b) in enumerate(zip(*runs)):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-6 * (np.max(np.abs(a)) if a.size else 1), equal_nan=True):
            raise ValueError(f"Output {flat[i]!r} of model {name!r} for one example changes with the other "
                             f"examples in its batch, so running micro-batches separately would train another "
                             f"model; tfpar.pipeline.split accepts models whose outputs are computed example by "
                             f"example (BatchNormalization is allowed: it normalises each micro-batch by itself).")
    if len(runs[0]) != len(flat):
        raise ValueError(f"Model {name!r} has an output without the batch as its first dimension (a sum or mean "
                         f"over the batch); tfpar.pipeline.split accepts models whose outputs are computed "
                         f"example by example.")


def segment_model(unit_list, first, last, name="segment"):
    """Units ``first`` to ``last`` inclusive as a ``graph.Segment`` taking and returning flat tuples (timing)."""
    return graph_lib.Segment(unit_list[first].graph, [op for u in unit_list[first:last + 1] for op in u.ops],
                             unit_list[first].input, unit_list[last].output, name)
