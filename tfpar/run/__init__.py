"""Layer 6, the run: ``TrainConfig``, the model/optimizer/loss recipe, the driver with one hook per
strategy, callbacks, data, the ``tfpar-train`` CLI and Ray. The only layer that reads a ``TrainConfig``."""
