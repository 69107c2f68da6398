"""The train, test and predict functions Keras ``fit``/``evaluate``/``predict`` call, on DTensor.

Keras 3's TF trainer traces its steps over plain tensors from a ``tf.data``
iterator. A model built in ``layout_scope`` gets its own ``make_*_function``
instead: each step takes the next host batch, packs it as a DTensor split
along the mesh's first axis (a batch that does not divide evenly is
replicated, so the math stays that of the whole batch), and runs compiled
functions. Training runs as three of them: gradients and metric updates, the
optimizer update, the metric results. In one function with the gradients,
DTensor in TF 2.21 let SGD-momentum read its slot before writing it (every
step applied the previous step's update), so the update never shares a
function with the gradients, and logs are read after both.
"""

import types

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.parallel.sharding.layers import adapt_layers
from tfpar.step import builder
from tfpar.step import plan as plans

def pack_batch(value, dmesh, batch_axis, per_process=False):
    """A host tensor as a DTensor split on ``batch_axis`` (replicated if it does not divide evenly).

    Each client packs only its own devices' slices, so every client must read
    the same global batch; with ``per_process`` each client's ``value`` is
    instead its own part of the global batch (Keras's ``distribute_dataset``),
    split over the batch shards its devices hold.
    """
    if value is None or (tf.is_tensor(value) and dtensor.is_dtensor(value)):
        return value
    value = tf.convert_to_tensor(value)
    rank = value.shape.rank
    local = dmesh.local_device_locations()
    shards = sorted({loc[batch_axis] for loc in local}) if per_process else list(range(dmesh.dim_size(batch_axis)))
    if rank == 0 or value.shape[0] % len(shards):
        if per_process and rank:
            raise ValueError(f"This process's batch of {value.shape[0]} rows does not split over the "
                             f"{len(shards)} shards of mesh axis {batch_axis!r} it holds; use a batch size that does.")
        return dtensor.pack([value] * len(local), dtensor.Layout.replicated(dmesh, rank))
    size = value.shape[0] // len(shards)
    pieces = [value[shards.index(loc[batch_axis]) * size:(shards.index(loc[batch_axis]) + 1) * size] for loc in local]
    return dtensor.pack(pieces, dtensor.Layout.batch_sharded(dmesh, batch_axis, rank))


def to_host(value):
    """A DTensor's whole value on the host (numpy), any layout; other values unchanged."""
    if not (tf.is_tensor(value) and dtensor.is_dtensor(value)):
        return value
    layout = dtensor.fetch_layout(value)
    if not layout.is_fully_replicated():
        value = dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    return dtensor.unpack(value)[0].numpy()


def attach(model, layouts, batch_axis=None):
    """Give ``model`` DTensor train/test/predict functions; idempotent.

    ``layout_scope`` calls it for every model compiled inside. Variables that
    Keras creates lazily (metrics, optimizer slots) are created on the first
    step inside the scope's variable creator, so they get layouts too.
    """
    plan = plans.of(model)
    if plan.layouts is layouts:
        return model
    optimizer = getattr(model, "optimizer", None)
    outside = [v.path for v in (optimizer.variables if optimizer is not None else [])
               if not isinstance(getattr(v, "value", v), dtensor.DVariable)]
    if outside:
        raise ValueError(f"The optimizer was created outside layout_scope (its variable {outside[0]!r} is not a "
                         f"DTensor variable); create it inside the scope, next to the model.")
    plan.layouts = layouts
    # A gradient can come out in another layout than its weight (a replicated
    # bias after a column-split kernel comes out split); the update needs the weight's.
    plan.relayout = lambda grads: [g if g is None else dtensor.relayout(g, layouts.layout(layouts.specs[w.path]))
                                   for g, w in zip(grads, model.trainable_weights)]
    dmesh = layouts.mesh
    batch_axis = batch_axis or dmesh.dim_names[0]
    per_process = getattr(layouts, "per_process", False)
    pack = lambda data: tf.nest.map_structure(lambda v: pack_batch(v, dmesh, batch_axis, per_process), data)  # noqa: E731

    def host_logs(logs):
        return {k: float(np.asarray(to_host(v))) for k, v in logs.items()}

    def unbuilt():
        parts = [model, getattr(model, "_compile_metrics", None), getattr(model, "_compile_loss", None),
                 getattr(model, "optimizer", None)]
        return any(part is not None and not part.built for part in parts)

    def first_call(data):
        """Build what Keras builds lazily, inside the layout scope, before anything is traced."""
        with layouts.creating():
            model._symbolic_build(data_batch=data)
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
        adapt_layers(model, layouts)

    def steps_then_logs(self, step, results):
        """Keras's multi-step function: up to ``steps_per_execution`` packed batches through ``step``, then logs.

        Running out of data after at least one step ends the call early, as in
        Keras; running out before the first re-raises so that ``fit`` ends the epoch.
        """
        def function(iterator):
            iterator = iter(iterator)  # train_on_batch/test_on_batch pass a list of one batch
            ran = False
            for _ in range(self.steps_per_execution):
                try:
                    data = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    if ran:
                        break
                    raise
                if unbuilt():
                    first_call(data)
                adapt_layers(self, layouts)
                step(pack(data))
                ran = True
            return host_logs(results())
        return function

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        own_step = builder.defines_own(self, "train")

        @tf.function(reduce_retracing=True)
        def user_step(data):
            self.train_step(data)

        gradients = tf.function(builder.gradient_step(self), reduce_retracing=True)

        @tf.function
        def apply(grads):
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))

        results = tf.function(self.get_metrics_result)

        def step(data):
            if own_step:
                user_step(data)
            else:
                apply(gradients(data))

        self.train_function = steps_then_logs(self, step, results)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function

        @tf.function(reduce_retracing=True)
        def step(data):
            self.test_step(data)

        self.test_function = steps_then_logs(self, step, tf.function(self.get_metrics_result))
        return self.test_function

    def make_predict_function(self, force=False):
        if self.predict_function is not None and not force:
            return self.predict_function

        @tf.function(reduce_retracing=True)
        def step(data):
            return self.predict_step(data)

        def function(batches):
            outputs = None
            for data in batches:
                if not self.built:
                    first_call(data)
                adapt_layers(self, layouts)
                out = tf.nest.map_structure(to_host, step(pack(data)))
                outputs = out if outputs is None else tf.nest.map_structure(
                    lambda a, b: np.concatenate([a, b]), outputs, out)
            # Tensors, as Keras's own predict function returns: Keras calls .numpy() on them.
            return tf.nest.map_structure(tf.convert_to_tensor, outputs)

        self.predict_function = function
        return function

    model.make_train_function = types.MethodType(make_train_function, model)
    model.make_test_function = types.MethodType(make_test_function, model)
    model.make_predict_function = types.MethodType(make_predict_function, model)
    model.train_function = model.test_function = model.predict_function = None
    return model
