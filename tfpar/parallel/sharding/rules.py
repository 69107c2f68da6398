"""Layout rules: an ordered list of (regex on the Keras variable path, spec).

A spec names, per dimension of the variable, the mesh axis it is split over
or ``None`` for "whole". ``(None, "model")`` splits a Dense kernel's output
columns over the ``model`` axis. The first rule whose regex ``re.search``-es
the path wins; variables no rule matches are replicated. Keras paths look
like ``fc1/kernel`` or ``block1_conv1/kernel``, which is why rules match
paths, not TF variable names (those are only ``kernel``).

Everything here is pure Python, so rule mistakes are caught before
TensorFlow starts and the memory table needs no devices.
"""

import json
import os
import re

_UNSHARDED = (None, "", "_", "*", "unsharded", "none", "None")

# Megatron-style pairs: the first dense layer is split by columns (outputs),
# the next by rows (inputs), so the pair needs one all-reduce, after the
# second. The classifier is split on classes. Convolution kernels are split
# on output channels: DTensor's Conv2D needs a whole filter, so tfpar
# all-gathers it just before the convolution (weights and optimizer slots
# stay 1/N per device; the convolution itself runs replicated over `model`).
_CONV = (r"conv[^/]*/kernel$", (None, None, None, "model"))
_CLASSIFIER = [(r"predictions/kernel$", (None, "model")), (r"predictions/bias$", ("model",))]
DEFAULT_RULES = {
    "vgg": [
        (r"(^|/)fc1/kernel$", (None, "model")),
        (r"(^|/)fc1/bias$", ("model",)),
        (r"(^|/)fc2/kernel$", ("model", None)),
        *_CLASSIFIER,
        _CONV,
    ],
    "alexnet": [
        (r"(^|/)fc6/kernel$", (None, "model")),
        (r"(^|/)fc6/bias$", ("model",)),
        (r"(^|/)fc7/kernel$", ("model", None)),
        *_CLASSIFIER,
        _CONV,
    ],
    "resnet": [*_CLASSIFIER, _CONV],
    # ViT, as Megatron-LM splits a transformer block: query, key and value by
    # heads and the attention output by rows (its heads), one all-reduce;
    # the MLP's first dense by columns, the second by rows, one all-reduce.
    "vit": [
        (r"attention/(query|key|value)/kernel$", (None, "model", None)),
        (r"attention/(query|key|value)/bias$", ("model", None)),
        (r"attention/attention_output/kernel$", ("model", None, None)),
        (r"(^|/)mlp1/kernel$", (None, "model")),
        (r"(^|/)mlp1/bias$", ("model",)),
        (r"(^|/)mlp2/kernel$", ("model", None)),
        *_CLASSIFIER,
    ],
}


class DefaultRules(list):
    """Rules tfpar chose, not the user: on a mesh they do not fit they degrade instead of failing.

    A spec entry naming an axis the mesh lacks is dropped (that dimension is
    whole), and a weight one of them cannot split evenly is replicated; each
    such decision is noted in the plan. A user's own rules stay strict.
    """

    lenient = True


def default_rules(model_name):
    """The default rules for a tfpar model name (``vgg16``, ``alexnet_bn``, ``resnet50``, ``vit_b16``...)."""
    for family, rules in DEFAULT_RULES.items():
        if model_name.startswith(family):
            return DefaultRules(rules)
    return DefaultRules()


def is_lenient(rules):
    return bool(getattr(rules, "lenient", False))


def _spec(value, where):
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"Layout spec for {where} must be a list of axis names or null, or a string like '_,model'; got {value!r}.")
    spec = []
    for part in parts:
        if part in _UNSHARDED:
            spec.append(None)
        elif isinstance(part, str):
            spec.append(part)
        else:
            raise ValueError(f"Layout spec for {where} has {part!r}; use a mesh axis name or null.")
    return tuple(spec)


def _is_layout_map(rules):
    # keras.distribution.LayoutMap, without importing Keras (this module is pure Python).
    return type(rules).__name__ == "LayoutMap" and hasattr(rules, "items")


def normalize(rules):
    """Rules as a list of ``(compiled regex, spec tuple)``.

    Accepts a dict or (regex, spec) pairs, or a ``keras.distribution.LayoutMap``
    (its keys are regexes on variable paths, its values ``TensorLayout``s or
    tuples of axis names, as for Keras's JAX ``ModelParallel``).
    """
    if rules is None:
        return []
    if _is_layout_map(rules):
        items = [(key, getattr(value, "axes", value)) for key, value in rules.items()]
    else:
        items = rules.items() if isinstance(rules, dict) else rules
    out = DefaultRules() if is_lenient(rules) else []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"A layout rule is a (regex, spec) pair, got {item!r}.")
        pattern, spec = item
        if hasattr(pattern, "search"):
            regex = pattern
        else:
            try:
                regex = re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"Layout rule regex {pattern!r} does not compile: {err}.") from None
        out.append((regex, _spec(spec, f"rule {regex.pattern!r}")))
    return out


def load(path):
    """Rules from a JSON file: ``{"regex": ["_", "model"], ...}`` (in order) or ``[[regex, spec], ...]``."""
    if not os.path.isfile(path):
        raise ValueError(f"Layout rules file {path!r} does not exist.")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"Layout rules file {path!r} is not valid JSON: {err}.") from None
    if not isinstance(data, (dict, list)):
        raise ValueError(f"Layout rules file {path!r} must hold a JSON object or list of [regex, spec] pairs.")
    return normalize(data)


def resolve(rules, path, shape, mesh_shape):
    """The spec for the variable at ``path`` with ``shape`` on a mesh of ``mesh_shape``.

    Raises ``ValueError`` when the matching rule has the wrong rank, names an
    unknown axis, uses an axis twice or splits a dimension unevenly (for
    ``DefaultRules``, only the first two; see ``resolve_noted``).
    """
    return resolve_noted(rules, path, shape, mesh_shape)[0]


def resolve_noted(rules, path, shape, mesh_shape):
    """``(spec, note)``: ``note`` says how lenient rules were adapted to this mesh, else ``None``."""
    shape = tuple(int(d) for d in shape)
    lenient = is_lenient(rules)
    for regex, spec in normalize(rules):
        if not regex.search(path):
            continue
        where = f"rule {regex.pattern!r} on variable {path!r} {list(shape)}"
        if len(spec) != len(shape):
            raise ValueError(f"{where}: the spec {list(spec)} has {len(spec)} entries but the variable has {len(shape)} dimensions.")
        named = [axis for axis in spec if axis is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"{where}: a mesh axis may split only one dimension, got {list(spec)}.")
        notes = []
        if lenient:
            missing = [axis for axis in named if axis not in mesh_shape]
            if missing:
                spec = tuple(None if axis in missing else axis for axis in spec)
                notes.append(f"the mesh has no axis {', '.join(map(repr, missing))}")
        for dim, axis in zip(shape, spec):
            if axis is None:
                continue
            if axis not in mesh_shape:
                raise ValueError(f"{where}: unknown mesh axis {axis!r}; the mesh has {', '.join(mesh_shape)}.")
            if dim % mesh_shape[axis]:
                if lenient:
                    notes.append(f"dimension {dim} does not divide evenly over {axis!r} of size {mesh_shape[axis]}")
                    return (None,) * len(shape), f"replicated: {'; '.join(notes)}"
                raise ValueError(
                    f"{where}: dimension {dim} does not divide evenly over mesh axis {axis!r} of size {mesh_shape[axis]}."
                )
        if notes:
            state = "replicated" if not any(spec) else f"split {list(spec)}"
            return spec, f"{state}: {'; '.join(notes)}"
        return spec, None
    return (None,) * len(shape), None


def shard_shape(shape, spec, mesh_shape):
    """The per-device shape of a variable laid out by ``spec``."""
    return tuple(int(d) // (mesh_shape[a] if a else 1) for d, a in zip(shape, spec))
