"""Layer 5, parallelism mechanisms: pipeline stages, DTensor sharding and parameter servers. They take
models, devices and clusters, never a ``TrainConfig``. Imports the layers below."""
