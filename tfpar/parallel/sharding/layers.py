"""Per-layer DTensor workarounds for a built model (TF 2.21's DTensor limits), applied once per layer."""

import types

from tensorflow.experimental import dtensor


def adapt_layers(model, layouts):
    """Make a built model's layers run on DTensor; idempotent.

    Two TF 2.21 DTensor limits are worked around, per layer instance:
    - Conv2D's SPMD expansion needs a replicated filter, so a sharded kernel
      is all-gathered (``relayout``) just before the convolution; its
      gradient is split back to the kernel's layout.
    - The fused batch-norm op has no DTensor layout propagation, so tfpar's
      ``FusedBatchNormalization`` uses Keras's unfused computation. Its
      statistics are over the whole global batch, as in an unsharded run.
    """
    import keras

    from tfpar.models.layers import FusedBatchNormalization

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, FusedBatchNormalization) and "_can_fuse" not in vars(layer):
            layer._can_fuse = lambda *args, **kwargs: False
        if isinstance(layer, keras.layers.Conv2D) and "convolution_op" not in vars(layer):
            spec = layouts.specs.get(layer.kernel.path)
            if spec and any(spec):
                whole = dtensor.Layout.replicated(layouts.mesh, len(spec))

                def convolution_op(self, inputs, kernel, _whole=whole):
                    return type(self).convolution_op(self, inputs, dtensor.relayout(kernel, _whole))

                layer.convolution_op = types.MethodType(convolution_op, layer)
    return model
