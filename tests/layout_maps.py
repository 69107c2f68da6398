"""A user's Keras LayoutMap factory for ``tfpar-train --layout_map=layout_maps:vgg_columns`` (tests only)."""

import keras


def vgg_columns(device_mesh):
    """tfpar's VGG fc1/fc2 pair as a Keras LayoutMap: fc1 split by columns, fc2 by rows."""
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["fc1/kernel"] = (None, "model")
    layout_map["fc1/bias"] = ("model",)
    layout_map["fc2/kernel"] = ("model", None)
    return layout_map
