"""DTensor variables for Keras 3 models, laid out by path rules.

Keras 3's TensorFlow backend has no working DTensor distribution, but every
Keras variable is backed by a ``tf.Variable`` created under TF's variable
creator scopes. ``layout_scope`` returns a ``dtensor.DVariable`` with the
layout the rules give the variable's Keras path (DESIGN.md item 5). Optimizer
slots are named ``<optimizer>/<variable path with _>_<slot>``; they take the
layout of the variable they belong to.
"""

import contextlib

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.parallel.sharding import meshes as mesh_lib
from tfpar.parallel.sharding import rules as rules_lib


class Layouts:
    """What ``layout_scope`` decided: Keras path -> (spec, ``dtensor.Layout``)."""

    def __init__(self, dmesh, rules):
        self.mesh = dmesh
        self.mesh_shape = mesh_lib.shape_of(dmesh)
        self.rules = rules_lib.normalize(rules)
        self.specs = {}  # path -> spec tuple, in creation order
        self.notes = {}  # path -> how default rules were adapted to this mesh
        self._by_flat_path = {}  # "fc1_kernel" -> spec, to find a slot's variable
        self.creator = self._creator  # a tf.variable_creator_scope creator (layout_scope's, keras_steps' lazy builds)
        self.batch_axis = self.mesh.dim_names[0]  # the axis batches are split over
        self.per_process = False  # True: each process feeds its own part of the batch (keras.distribution)

    def _creator(self, next_creator, **kwargs):
        name = (kwargs.get("name") or "variable").split(":")[0].rpartition("/")[2]
        return self.create(_current_keras_path(name), kwargs)

    def create(self, path, kwargs):
        """A ``ShardedVariable`` for the Keras variable at ``path`` (``kwargs``: those of ``tf.Variable``)."""
        name = (kwargs.get("name") or "variable").split(":")[0].rpartition("/")[2]
        initial = kwargs["initial_value"]
        with tf.init_scope():
            value = initial() if callable(initial) else initial
            value = tf.convert_to_tensor(value, dtype=kwargs.get("dtype"))
            layout = self.layout(self.spec_for(path, value.shape))
            variable = ShardedVariable(put(value, layout), trainable=kwargs.get("trainable", True), name=name)
            variable.tfpar_layout = layout
            return variable

    def creating(self):
        """Re-enter the scope's variable creator (for variables Keras creates lazily, in ``fit``)."""
        return tf.variable_creator_scope(self.creator)

    def layout(self, spec):
        return dtensor.Layout([a or dtensor.UNSHARDED for a in spec], self.mesh)

    def spec_for(self, path, shape):
        spec = self._slot_spec(path, shape)
        if spec is None:
            spec, note = rules_lib.resolve_noted(self.rules, path, shape, self.mesh_shape)
            if note:
                self.notes[path] = note
            self._by_flat_path[path.replace("/", "_")] = spec
        self.specs[path] = spec
        return spec

    def _slot_spec(self, path, shape):
        """The spec of the model variable an optimizer slot belongs to, if it is one."""
        _, _, name = path.rpartition("/")
        best = None
        for flat, spec in self._by_flat_path.items():
            if name.startswith(flat + "_") and len(spec) == len(shape) and (best is None or len(flat) > len(best[0])):
                best = (flat, spec)
        return best[1] if best else None


def _current_keras_path(name):
    # Keras builds a variable's path from its name scope stack; the creator
    # runs inside Variable.__init__, so the stack is the variable's own.
    from keras.src.backend.common.name_scope import current_path

    parent = current_path()
    return f"{parent}/{name}" if parent else name


def put(value, layout):
    """A host value as a DTensor with ``layout`` (replicated copy, then split)."""
    value = tf.convert_to_tensor(value)
    replicated = dtensor.Layout.replicated(layout.mesh, value.shape.rank)
    tensor = dtensor.copy_to_mesh(value, replicated)
    return tensor if layout.is_fully_replicated() else dtensor.relayout(tensor, layout)


def _gather(tensor):
    layout = dtensor.fetch_layout(tensor)
    if not layout.is_fully_replicated():
        tensor = dtensor.relayout(tensor, dtensor.Layout.replicated(layout.mesh, layout.rank))
    return dtensor.unpack(tensor)[0].numpy()


class ShardedVariable(dtensor.DVariable):
    """A ``DVariable`` that reads out whole and takes whole host values.

    So Keras's own ``get_weights``/``set_weights``/``save_weights``/
    ``load_weights`` work on sharded weights: a plain DVariable refuses to
    copy a sharded value to the host, and to assign a host value.
    """

    def numpy(self):
        return _gather(self.read_value())

    def __array__(self, dtype=None):
        value = self.numpy()
        return value.astype(dtype) if dtype is not None else value

    def assign(self, value, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly() and not (tf.is_tensor(value) and dtensor.is_dtensor(value)):
            value = put(tf.cast(value, self.dtype), self.tfpar_layout)
        return super().assign(value, use_locking=use_locking, name=name, read_value=read_value)


@contextlib.contextmanager
def layout_scope(dmesh, rules=None, batch_axis=None):
    """Create every variable inside as a ``DVariable`` laid out by ``rules``; yields ``Layouts``.

    Build the model and ``compile`` it inside, as with ``strategy.scope()``;
    afterwards ``fit``, ``evaluate`` and ``predict`` split batches over
    ``batch_axis`` (default: the mesh's first axis), see ``keras_steps``.
    ``rules`` is a list/dict of (regex, spec) or a ``keras.distribution.LayoutMap``;
    ``dmesh`` a ``dtensor.Mesh`` or a ``keras.distribution.DeviceMesh``.
    """
    from tfpar.parallel.sharding import keras_steps

    if type(dmesh).__name__ == "DeviceMesh":  # keras.distribution.DeviceMesh: the same shape over this job's devices
        dmesh = mesh_lib.mesh(dict(zip(dmesh.axis_names, (int(d) for d in dmesh.shape))))
    if batch_axis is not None and batch_axis not in dmesh.dim_names:
        raise ValueError(f"batch_axis {batch_axis!r} is not a mesh axis; the mesh has {', '.join(dmesh.dim_names)}.")
    layouts = Layouts(dmesh, rules)
    layouts.batch_axis = batch_axis or layouts.batch_axis
    with tf.variable_creator_scope(layouts.creator), _compiled_models_get_steps(layouts, batch_axis, keras_steps.attach):
        yield layouts


@contextlib.contextmanager
def _compiled_models_get_steps(layouts, batch_axis, attach):
    # A model compiled inside the scope gets DTensor train/test/predict functions.
    # Keras has no hook for "compiled under this scope", so keras.Model.compile is
    # wrapped while the scope is open (process-wide: open one scope at a time).
    import keras

    own = "compile" in vars(keras.Model)
    original = keras.Model.compile

    def compile(model, *args, **kwargs):
        original(model, *args, **kwargs)
        attach(model, layouts, batch_axis)

    keras.Model.compile = compile
    try:
        yield
    finally:
        if own:
            keras.Model.compile = original
        else:
            del keras.Model.compile


def host_value(variable):
    """A Keras/DTensor variable's full value as numpy (works for any layout)."""
    tensor = tf.convert_to_tensor(getattr(variable, "value", variable))
    return _gather(tensor) if dtensor.is_dtensor(tensor) else tensor.numpy()


def local_shapes(variable):
    """The shapes of ``variable``'s components on this client's devices."""
    tensor = tf.convert_to_tensor(variable.value)
    return [tuple(c.shape) for c in dtensor.unpack(tensor)]


def assign(variable, array, layouts):
    """Assign a full host value to a DTensor-backed Keras variable, keeping its layout."""
    spec = layouts.specs[variable.path]
    variable.assign(put(tf.cast(array, variable.dtype), layouts.layout(spec)))
