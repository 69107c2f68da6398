"""Public API: ``tfpar.train.run(TrainConfig(...))`` is ``tfpar-train`` from Python (``tfpar.run``)."""

from tfpar.run.config import TrainConfig
from tfpar.run.driver import run

__all__ = ["TrainConfig", "run"]
