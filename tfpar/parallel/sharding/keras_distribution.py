"""Keras's own ``keras.distribution`` API (DataParallel, ModelParallel, LayoutMap) on TensorFlow, through DTensor.

Keras 3's TensorFlow ``distribution_lib`` is a prototype: ``initialize`` is
missing and a distribution set with ``set_distribution`` is silently ignored
(DESIGN.md item 21). ``install()`` fills in the backend functions Keras's
frontend calls and makes Keras consult the current distribution where it
matters on TensorFlow, all on tfpar's ``layout_scope`` machinery:

- a variable created while a distribution is current becomes a DTensor
  variable laid out by the distribution (DataParallel: replicated;
  ModelParallel: the LayoutMap's layout for its path; optimizer slots follow
  their variable);
- a model compiled while one is current (or predicted with an uncompiled
  model) gets the DTensor train/test/predict functions of ``keras_steps``,
  batches split over the distribution's batch axis;
- ``layout_map["name/output"]`` relayouts that layer's output
  (``distribute_tensor``);
- calling such a model on host values packs them onto its mesh and returns
  the whole result.

Nothing falls back silently: what tfpar cannot honour is one sentence
(``DistributionError``) before anything is trained or written.
"""

import functools
import os
import weakref

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.core import internals
from tfpar.parallel.sharding import keras_steps
from tfpar.parallel.sharding import meshes as mesh_lib
from tfpar.parallel.sharding import variables as variables_lib
from tfpar.step import plan as plans


class DistributionError(ValueError):
    """A keras.distribution setting tfpar cannot honour on TensorFlow (one sentence)."""


_layouts = weakref.WeakKeyDictionary()  # Distribution -> variables_lib.Layouts
_installed = []


# ----- the backend functions Keras's frontend calls ---------------------------------------------

def _device_kind(device_type=None):
    if device_type:
        return device_type.upper()
    if dtensor.num_clients() > 1:
        return dtensor.preferred_device_type().upper()
    return mesh_lib._device_type()


def list_devices(device_type=None):
    """Every device of ``device_type`` over all processes, as ``"cpu:0"``..., global ids in process order."""
    kind = _device_kind(device_type)
    if dtensor.num_clients() > 1:
        count = dtensor.num_global_devices(kind)
    else:
        count = len(tf.config.list_logical_devices(kind))
    return [f"{kind.lower()}:{i}" for i in range(count)]


def get_device_count(device_type=None):
    return len(list_devices(device_type))


def num_processes():
    return dtensor.num_clients()


def process_id():
    return dtensor.client_id()


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Start multi-client DTensor: one client per process, ``job_addresses`` listing every process.

    With no arguments the cluster is read as tfpar reads it (``DTENSOR_*``,
    TF_CONFIG, Slurm, Kubernetes); in one process nothing needs starting, as on JAX.
    """
    if job_addresses is None and num_processes is None and process_id is None:
        from tfpar.runtime import cluster

        mesh_lib.dtensor_env_from_cluster(cluster.detect())
        if int(os.environ.get("DTENSOR_NUM_CLIENTS", "1")) > 1:
            _start_clients()
        return
    addresses = [a.strip() for a in (job_addresses or "").split(",") if a.strip()]
    count = len(addresses) if num_processes is None else int(num_processes)
    if len(addresses) != count:
        raise DistributionError(f"initialize needs one address per process in job_addresses: got {len(addresses)} "
                                f"for num_processes={count}.")
    index = 0 if process_id is None else int(process_id)
    if not 0 <= index < count:
        raise DistributionError(f"initialize got process_id={index}, but with num_processes={count} it must be "
                                f"0 to {count - 1}.")
    if count == 1:
        return
    os.environ.update(DTENSOR_JOBS=",".join(addresses), DTENSOR_NUM_CLIENTS=str(count),
                      DTENSOR_CLIENT_ID=str(index), DTENSOR_JOB_NAME=os.environ.get("DTENSOR_JOB_NAME", "worker"))
    _start_clients()


def _start_clients():
    try:
        dtensor.initialize_accelerator_system(dtensor.preferred_device_type())
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise


def _to_backend_mesh(device_mesh):
    """A ``keras.distribution.DeviceMesh`` as a ``dtensor.Mesh`` over the same devices, in the same order."""
    shape = dict(zip(device_mesh.axis_names, (int(d) for d in device_mesh.shape)))
    names = [str(d) for d in np.asarray(device_mesh.devices).flatten()]
    kinds = {name.rpartition(":")[0].rpartition("/")[2].upper() for name in names}
    if len(kinds) != 1:
        raise DistributionError(f"A DeviceMesh holds devices of one type, got {', '.join(sorted(kinds))}.")
    kind = kinds.pop()
    have = get_device_count(kind)
    need = mesh_lib.device_count(shape)
    text = ",".join(f"{k}={v}" for k, v in shape.items())
    ids = [int(name.rpartition(":")[2]) if name.rpartition(":")[2].isdigit() else -1 for name in names]
    if need > have or min(ids) < 0 or max(ids) >= have:
        raise DistributionError(f"The DeviceMesh {text} needs {need} {kind} devices ({', '.join(names)}) but "
                                f"{have} exist; use keras.distribution.list_devices() to build it.")
    if dtensor.num_clients() > 1:
        if ids != list(range(have)):
            raise DistributionError(f"Across processes a DeviceMesh must hold every device in list_devices() order; "
                                    f"{text} holds {need} of {have}.")
        return mesh_lib.mesh(shape, device_type=kind)
    return dtensor.create_mesh(list(shape.items()), devices=[f"/device:{kind}:{i}" for i in ids], device_type=kind)


def _to_backend_layout(tensor_layout):
    if tensor_layout.device_mesh is None:
        raise DistributionError(f"The TensorLayout {tuple(tensor_layout.axes)} has no DeviceMesh; give it one or "
                                f"put it in a LayoutMap.")
    return dtensor.Layout([a or dtensor.UNSHARDED for a in tensor_layout.axes], tensor_layout.device_mesh.backend_mesh)


def _layout_of(layout):
    return layout if isinstance(layout, dtensor.Layout) else layout.backend_layout


@tf.autograph.experimental.do_not_convert
def distribute_tensor(tensor, layout):
    """``tensor`` in ``layout``: a relayout of a DTensor (in a step), a host value put onto the mesh."""
    layout = _layout_of(layout)
    if not _divides(tensor.shape, layout):
        return tensor  # a short batch runs replicated (keras_steps.pack_batch); its outputs stay so
    if not tf.executing_eagerly() or dtensor.is_dtensor(tensor):
        return dtensor.relayout(tensor, layout)
    return variables_lib.put(tensor, layout)


def _divides(shape, layout):
    return all(d is None or axis == dtensor.UNSHARDED or d % layout.mesh.dim_size(axis) == 0
               for d, axis in zip(shape, layout.sharding_specs))


def distribute_variable(value, layout):
    variable = variables_lib.ShardedVariable(variables_lib.put(value, _layout_of(layout)))
    variable.tfpar_layout = _layout_of(layout)
    return variable


def distribute_data_input(per_process_batch, layout, batch_dim_name):
    return keras_steps.pack_batch(per_process_batch, _layout_of(layout).mesh, batch_dim_name,
                                  per_process=dtensor.num_clients() > 1)


BACKEND_FUNCTIONS = {f.__name__: f for f in (
    list_devices, get_device_count, num_processes, process_id, initialize, distribute_tensor,
    distribute_variable, distribute_data_input, _to_backend_mesh, _to_backend_layout)}


# ----- a distribution as tfpar layouts --------------------------------------------------------

def layouts_for(distribution):
    """The ``Layouts`` (mesh, rules, batch axis) that carry out ``distribution``; one per distribution."""
    found = _layouts.get(distribution)
    if found is not None:
        return found
    # Exact types: a subclass may lay out variables its own way, which tfpar would silently ignore.
    if type(distribution) is keras.distribution.ModelParallel:
        rules = distribution._layout_map  # hook model_parallel_layout_map
    elif type(distribution) is keras.distribution.DataParallel:
        rules = []
    else:
        raise DistributionError(f"{type(distribution).__name__} is not supported by tfpar on TensorFlow; use "
                                f"keras.distribution.DataParallel or ModelParallel.")
    if tf.distribute.has_strategy():
        raise DistributionError(f"A keras.distribution ({type(distribution).__name__}) and a tf.distribute strategy "
                                f"scope are both active; use one of them.")
    layouts = variables_lib.Layouts(distribution.device_mesh.backend_mesh, rules)
    layouts.batch_axis = distribution.batch_dim_name or layouts.batch_axis
    layouts.per_process = dtensor.num_clients() > 1  # as on JAX: each process feeds its own part
    _layouts[distribution] = layouts
    return layouts


def layout_map_from(spec, mesh_shape):
    """The LayoutMap ``"module:function"`` makes for a DeviceMesh of ``mesh_shape`` (``tfpar-train --layout_map``)."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    try:
        factory = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise DistributionError(f"layout_map {spec!r} cannot be loaded ({type(err).__name__}: {err}).") from None
    count = mesh_lib.device_count(mesh_shape)
    device_mesh = keras.distribution.DeviceMesh(tuple(mesh_shape.values()), list(mesh_shape),
                                                devices=[f"cpu:{i}" for i in range(count)])  # names only
    try:
        layout_map = factory(device_mesh)
    except (TypeError, ValueError) as err:
        raise DistributionError(f"layout_map {spec!r} failed for the mesh "
                                f"{','.join(f'{k}={v}' for k, v in mesh_shape.items())}: {str(err).rstrip('.')}.") from None
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise DistributionError(f"layout_map {spec!r} returned {type(layout_map).__name__}, not a "
                                f"keras.distribution.LayoutMap.")
    return layout_map


def current():
    distribution = keras.distribution.distribution()
    return None if distribution is None else layouts_for(distribution)


def _is_dtensor_variable(variable):
    return isinstance(getattr(variable, "value", variable), dtensor.DVariable)


def attach(model, layouts):
    """Give ``model`` the DTensor steps for ``layouts``; its variables must have been made under them."""
    if plans.of(model).layouts is layouts:
        return model
    optimizer = getattr(model, "optimizer", None)
    outside = [v for v in model.variables if not _is_dtensor_variable(v)]
    if outside:
        raise DistributionError(
            f"The model's variable {outside[0].path!r} was created before "
            f"{type(keras.distribution.distribution()).__name__} was set; build the model after "
            f"keras.distribution.set_distribution(...) or inside distribution.scope().")
    outside = [v for v in (optimizer.variables if optimizer is not None else []) if not _is_dtensor_variable(v)]
    if outside:
        raise DistributionError(
            f"The optimizer's variable {outside[0].path!r} was created before the distribution was set; create "
            f"the optimizer after keras.distribution.set_distribution(...) or inside distribution.scope().")
    return keras_steps.attach(model, layouts, layouts.batch_axis)


# ----- where Keras meets the distribution -------------------------------------------------------

def _wrap(owner, name, make):
    original = getattr(owner, name)
    replacement = tf.autograph.experimental.do_not_convert(make(original))
    functools.update_wrapper(replacement, original)
    replacement.__tfpar_original__ = original
    setattr(owner, name, replacement)


def _variable_initialize(original):
    def _initialize(self, value):
        layouts = None if isinstance(value, tf.Variable) else current()
        if layouts is None:
            return original(self, value)
        path = self.path
        with tf.variable_creator_scope(lambda next_creator, **kwargs: layouts.create(path, kwargs)):
            return original(self, value)
    return _initialize


def _compile(original):
    def compile(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        layouts = current()
        if layouts is not None:
            attach(self, layouts)
        return result
    return compile


def _make_predict_function(original):
    def make_predict_function(self, force=False):
        layouts = current()
        if layouts is not None and plans.of(self).layouts is None:
            attach(self, layouts)
            return self.make_predict_function(force)  # keras_steps' own, now on the instance
        return original(self, force)
    return make_predict_function


def _on_host(value):
    return isinstance(value, np.ndarray) or (tf.is_tensor(value) and not dtensor.is_dtensor(value)
                                             and not isinstance(value, tf.Variable))


def _model_call(original):
    def __call__(self, *args, **kwargs):
        plan = self.__dict__.get(plans.ATTRIBUTE)
        layouts = getattr(plan, "layouts", None) or (current() if self.built else None)
        if layouts is None or not args or not tf.executing_eagerly():
            return original(self, *args, **kwargs)
        leaves = tf.nest.flatten(args[0])
        if not leaves or not all(_on_host(v) for v in leaves):
            return original(self, *args, **kwargs)
        inputs = tf.nest.map_structure(
            lambda v: keras_steps.pack_batch(v, layouts.mesh, layouts.batch_axis, layouts.per_process), args[0])
        outputs = original(self, inputs, *args[1:], **kwargs)
        return tf.nest.map_structure(
            lambda v: tf.convert_to_tensor(keras_steps.to_host(v)) if tf.is_tensor(v) else v, outputs)
    return __call__


def install():
    """Fill in Keras's TF ``distribution_lib`` and connect Keras to the current distribution; idempotent."""
    if _installed:
        return
    backend = internals.get("tf_distribution_lib")
    for name, function in BACKEND_FUNCTIONS.items():
        setattr(backend, name, function)
    _wrap(internals.get("tf_variable_class"), "_initialize", _variable_initialize)
    _wrap(internals.get("trainer_base_class"), "compile", _compile)
    _wrap(internals.get("trainer_class"), "make_predict_function", _make_predict_function)
    _wrap(internals.get("model_class"), "__call__", _model_call)
    _installed.append(True)


def needed():
    """True while Keras's TF ``distribution_lib`` is still the prototype (it has no ``initialize``)."""
    return bool(_installed) or not hasattr(internals.get("tf_distribution_lib"), "initialize")
