"""Layer 2, the step: one Keras train step built from one plan on the model (micro-batches, gradient
buckets, the all-reduce dtype, per-replica XLA, worker timing and balanced shares). Imports only ``core``.

Bottom to top: ``plan`` (the StepPlan on the model), the mechanics ``pieces`` (batches, forward/backward,
state), ``reduce`` (the bucketed / bfloat16 all-reduce), ``jit`` (XLA compile-or-fallback) and ``timing``
(clock stamps, balanced slices); ``builder`` (the one builder: ``install(model)``); and the features'
installers, which only set plan fields: ``steps.accumulate``, ``all_reduce``, ``xla``, ``stragglers``."""
