"""Public API: ``tfpar.cluster.detect()`` reads the cluster (TF_CONFIG, Slurm, Kubernetes, TPU VM); see ``tfpar.runtime.cluster``."""

from tfpar.runtime.cluster import ClusterError, ClusterInfo, detect, pin_gpus, tpu_address, tpu_resolver

__all__ = ["ClusterError", "ClusterInfo", "detect", "pin_gpus", "tpu_address", "tpu_resolver"]
