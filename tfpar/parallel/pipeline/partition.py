"""Cutting a functional (or Sequential) Keras model into consecutive stages.

A cut is a place in the layers' topological order where exactly one tensor
crosses from the layers before it to the layers after it: anywhere between
layers in AlexNet or VGG, only between residual blocks in ResNet (inside a
block the shortcut and the branch both cross). Stages are Keras functional
models built on the original layers' tensors, so the layers, and with them
the weights, are shared with the original model.
"""

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass
class Unit:
    """The layers between two neighbouring cuts: the smallest piece a stage can hold."""

    layers: list  # keras layers, in order
    input: object  # the KerasTensor entering the unit
    output: object  # the KerasTensor leaving it


def _graph(model):
    """``model`` as a single-input, single-output functional graph: (operations, input, output)."""
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(f"Sequential model {model.name!r} must be built with an Input before it can be split.")
        model = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers, as a graph
    elif not isinstance(model, keras.Model) or not hasattr(model, "operations") or not _is_functional(model):
        raise ValueError(f"Model {getattr(model, 'name', model)!r} is subclassed and has no layer graph to cut; "
                         f"tfpar.pipeline.split accepts functional and Sequential Keras models.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         f"tfpar.pipeline.split accepts models with one input and one output.")
    operations = [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]
    for op in operations:
        if len(getattr(op, "_inbound_nodes", ())) > 1:
            raise ValueError(f"Layer {op.name!r} is called more than once in {model.name!r}; "
                             f"tfpar.pipeline.split accepts models whose layers are each called once.")
    return operations, model.inputs[0], model.outputs[0]


def _is_functional(model):
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def units(model):
    """``model`` cut at every place where one tensor crosses: a list of ``Unit``.

    Raises ``ValueError`` for a subclassed model or a graph tfpar cannot cut.
    """
    operations, model_input, model_output = _graph(model)
    producer = {id(model_input): -1}
    for i, op in enumerate(operations):
        producer[id(op.output)] = i
    last_use = {id(model_output): len(operations)}  # the model output "is used" after the last layer
    for i, op in enumerate(operations):
        for t in tf.nest.flatten(op.input):
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
    tensors = {id(model_input): model_input, **{id(op.output): op.output for op in operations}}
    result, start, entering = [], 0, model_input
    for i in range(len(operations) - 1):
        crossing = [t for t, p in producer.items() if p <= i and last_use.get(t, -1) > i]
        if len(crossing) == 1 and producer[crossing[0]] == i:
            result.append(Unit(operations[start:i + 1], entering, operations[i].output))
            start, entering = i + 1, tensors[crossing[0]]
    result.append(Unit(operations[start:], entering, model_output))
    return result


def cut_names(unit_list):
    """The layer names after which a stage may end: each unit's last layer but the final one."""
    return [u.layers[-1].name for u in unit_list[:-1]]


def groups_from_names(unit_list, names, model):
    """Unit counts per stage for a list of cut-layer names (stages end after each named layer)."""
    allowed = cut_names(unit_list)
    layer_names = {layer.name for layer in model.layers}
    bounds = []
    for name in names:
        if name not in allowed:
            where = ("is not a layer of the model" if name not in layer_names else
                     "is not a cut point (more than one tensor crosses there, e.g. inside a residual block)")
            raise ValueError(f"Cut layer {name!r} {where}; cut after one of: {', '.join(allowed)}.")
        bounds.append(allowed.index(name) + 1)
    if bounds != sorted(set(bounds)):
        raise ValueError(f"Cut layers {list(names)} must be distinct and in model order.")
    edges = [0] + bounds + [len(unit_list)]
    return [b - a for a, b in zip(edges, edges[1:])]


def stage_models(unit_list, counts, name="stage"):
    """One keras functional model per stage, holding ``counts[s]`` consecutive units; layers are shared."""
    models, start = [], 0
    for s, count in enumerate(counts):
        chunk = unit_list[start:start + count]
        start += count
        models.append(keras.Model(chunk[0].input, chunk[-1].output, name=f"{name}{s}"))
    return models


def segment_model(unit_list, first, last, name="segment"):
    """A functional model of units ``first`` to ``last`` inclusive (for timing a candidate segment)."""
    return keras.Model(unit_list[first].input, unit_list[last].output, name=name)
