"""Public API: ``tfpar.precision.apply(policy, strategy)`` sets the global Keras dtype policy (``tfpar.runtime.precision``)."""

from tfpar.runtime.precision import POLICIES, apply, cpu_has_native_bf16, loss_scale_optimizer, offer, resolve

__all__ = ["POLICIES", "apply", "cpu_has_native_bf16", "loss_scale_optimizer", "offer", "resolve"]
