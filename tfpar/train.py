"""Public API: ``tfpar.train.run(TrainConfig(...))`` is ``tfpar-train`` from Python (``tfpar.run``);
``tfpar.train.autotune(model, strategy, dataset)`` is its ``--autotune`` for a model of your own."""

from tfpar.run.autotune import autotune
from tfpar.run.config import TrainConfig
from tfpar.run.driver import run

__all__ = ["TrainConfig", "autotune", "run"]
