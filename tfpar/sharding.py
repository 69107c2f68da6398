"""Public API: DTensor sharding of Keras models, ``layout_scope(mesh, rules)`` (``tfpar.parallel.sharding``)."""

from tfpar.parallel.sharding import DEFAULT_RULES, default_rules, load_rules, mesh, parse_mesh

__all__ = ["DEFAULT_RULES", "ShardedTrainer", "default_rules", "layout_scope", "load_rules", "mesh", "parse_mesh"]


def __getattr__(name):  # TensorFlow is imported only when these are used
    if name in ("ShardedTrainer", "layout_scope"):
        from tfpar.parallel import sharding

        return getattr(sharding, name)
    raise AttributeError(name)
