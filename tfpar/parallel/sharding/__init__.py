"""DTensor tensor sharding for Keras 3 models on TensorFlow.

    import keras
    from tfpar import models, sharding
    mesh = sharding.mesh("batch=2,model=2", virtual_cpus=4)
    with sharding.layout_scope(mesh, sharding.default_rules("vgg16")):   # or a keras LayoutMap
        model = models.build("vgg16", num_classes=10, input_shape=(32, 32, 3))
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(dataset, epochs=2, steps_per_epoch=50)

``mesh`` makes the device mesh, ``rules`` maps Keras variable paths to
layouts, ``layout_scope`` creates variables as DTensor variables and gives
models compiled inside DTensor train/test/predict steps (``keras_steps``),
``report`` tables what is split where, ``ShardedTrainer`` is the older
factory form with sharded checkpoints (``tfpar.run.hooks.dtensor`` is
``tfpar-train --strategy=dtensor``).
"""

from tfpar.parallel.sharding.meshes import mesh, parse as parse_mesh
from tfpar.parallel.sharding.rules import DEFAULT_RULES, default_rules, load as load_rules

__all__ = ["DEFAULT_RULES", "ShardedTrainer", "default_rules", "layout_scope", "load_rules", "mesh",
           "parse_mesh"]


_LAZY = {"ShardedTrainer": "trainer", "layout_scope": "variables"}


def __getattr__(name):  # TensorFlow is imported only when these are used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tfpar.parallel.sharding.{_LAZY[name]}"), name)
    raise AttributeError(name)
