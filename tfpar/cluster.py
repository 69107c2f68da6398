"""Where am I? Cluster discovery from TF_CONFIG (and, later, Slurm, Kubeflow, TPU).

``detect()`` returns a small ``ClusterInfo``; nothing here starts servers or
touches devices, so it is cheap to call and easy to test from environment
fixtures.
"""

import dataclasses
import json
import os

TASK_TYPES = ("chief", "worker", "ps", "evaluator")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the cluster."""

    task_type: str = "worker"
    task_index: int = 0
    num_workers: int = 1  # chief + workers: the processes that compute gradients
    num_ps: int = 0
    source: str = "local"  # local | explicit | tf_config | slurm | kubeflow | tpu
    cluster_spec: dict = dataclasses.field(default_factory=dict)

    @property
    def is_chief(self):
        """The chief writes checkpoints and summaries (worker 0 when there is no chief)."""
        if "chief" in self.cluster_spec:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def task_name(self):
        return f"{self.task_type}-{self.task_index}"

    def resolver(self):
        """A ``tf.distribute.cluster_resolver`` for this cluster."""
        import tensorflow as tf

        if not self.cluster_spec:
            return tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec({}))
        return tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(self.cluster_spec),
            task_type=self.task_type,
            task_id=self.task_index,
            rpc_layer="grpc",
        )


class ClusterError(ValueError):
    """The cluster description is malformed; the message says how."""


def from_tf_config(raw, source="tf_config"):
    """Parse a TF_CONFIG JSON string into ``ClusterInfo``, validating it."""
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({err.msg} at position {err.pos}).") from None
    if not isinstance(config, dict):
        raise ClusterError("TF_CONFIG must be a JSON object with 'cluster' and 'task'.")
    cluster = config.get("cluster")
    task = config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ClusterError("TF_CONFIG has no 'cluster' object mapping task types to address lists.")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ClusterError("TF_CONFIG has no 'task' with 'type' and 'index'.")
    seen = {}
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise ClusterError(f"TF_CONFIG names unknown task type {task_type!r}; accepted: {', '.join(TASK_TYPES)}.")
        if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
            raise ClusterError(f"TF_CONFIG cluster[{task_type!r}] must be a list of 'host:port' strings.")
        for i, address in enumerate(addresses):
            if address in seen:
                raise ClusterError(f"TF_CONFIG gives address {address} to both {seen[address]} and {task_type}:{i}.")
            seen[address] = f"{task_type}:{i}"
    task_type, index = task["type"], task["index"]
    if task_type not in TASK_TYPES:
        raise ClusterError(f"TF_CONFIG task type {task_type!r} is unknown; accepted: {', '.join(TASK_TYPES)}.")
    if task_type == "evaluator":
        members = 1
    else:
        if task_type not in cluster:
            raise ClusterError(f"TF_CONFIG task type {task_type!r} is not in the cluster ({', '.join(cluster)}).")
        members = len(cluster[task_type])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < members:
        raise ClusterError(f"TF_CONFIG task index {index!r} is out of range for {task_type!r} (0..{members - 1}).")
    return ClusterInfo(
        task_type=task_type,
        task_index=index,
        num_workers=len(cluster.get("chief", [])) + len(cluster.get("worker", [])),
        num_ps=len(cluster.get("ps", [])),
        source=source,
        cluster_spec={k: list(v) for k, v in cluster.items()},
    )


def detect(environ=None):
    """This process's ``ClusterInfo`` from its environment (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    if env.get("TF_CONFIG"):
        return from_tf_config(env["TF_CONFIG"])
    return ClusterInfo()
