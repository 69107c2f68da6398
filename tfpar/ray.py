"""Public API: ``tfpar.ray.train(config, num_workers)`` trains on a Ray cluster (``tfpar.run.ray``)."""

from tfpar.run.ray import train

__all__ = ["train"]
