"""Layer 2, the step: one Keras train step built from one plan on the model (micro-batches, gradient
buckets, the all-reduce dtype, per-replica XLA, worker timing and balanced shares). Imports only ``core``."""
