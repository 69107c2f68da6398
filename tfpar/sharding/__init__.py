"""DTensor tensor sharding for Keras 3 models on TensorFlow.

    from tfpar import sharding
    mesh = sharding.mesh("batch=2,model=2", virtual_cpus=4)
    trainer = sharding.ShardedTrainer(lambda: models.build("vgg16", ...), mesh,
                                      sharding.default_rules("vgg16"))
    trainer.fit(dataset, epochs=2, steps_per_epoch=50)

``mesh`` makes the device mesh, ``rules`` maps Keras variable paths to
layouts, ``layout_scope`` creates variables as DTensor variables,
``ShardedTrainer`` trains, ``report`` tables what is split where, and
``train`` is the ``tfpar-train --strategy=dtensor`` path.
"""

from tfpar.sharding.meshes import mesh, parse as parse_mesh
from tfpar.sharding.rules import DEFAULT_RULES, default_rules, load as load_rules

__all__ = ["DEFAULT_RULES", "ShardedTrainer", "default_rules", "layout_scope", "load_rules", "mesh",
           "parse_mesh", "train"]


_LAZY = {"ShardedTrainer": "trainer", "layout_scope": "variables", "train": "driver"}


def __getattr__(name):  # TensorFlow is imported only when these are used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tfpar.sharding.{_LAZY[name]}"), name)
    raise AttributeError(name)
