"""Where am I? Cluster discovery: explicit, TF_CONFIG, Kubeflow, a Kubernetes Indexed Job, Slurm, TPU.

``detect()`` returns a small ``ClusterInfo``; nothing here starts servers or
touches devices, so it is cheap to call and easy to test from environment
fixtures. Order (first match wins):

1. an explicit cluster passed in (``ClusterInfo``, TF_CONFIG dict or JSON);
2. ``TF_CONFIG`` -- source ``kubeflow`` when it runs in a Kubernetes pod (a
   Kubeflow TFJob sets TF_CONFIG for each replica), else ``tf_config``;
3. a Kubernetes Indexed Job (``JOB_COMPLETION_INDEX`` plus ``TFPAR_WORKER_HOSTS``
   or ``TFPAR_JOB_NAME``/``TFPAR_SERVICE``/``TFPAR_NUM_WORKERS``) behind a
   headless Service: worker ``i`` is ``<job>-<i>.<service>`` (docs/kubernetes.md);
4. Slurm (``SLURM_PROCID`` + ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``), laid
   out as ``SlurmClusterResolver`` does: hosts sorted, ports ``port_base +
   local task index``; one task per node or one per GPU;
5. TPU: ``TPU_NAME``, or a TPU attached to this VM (``/dev/accel0``,
   ``/dev/vfio/0`` or ``TPU_ACCELERATOR_TYPE``): Cloud TPU VMs and Colab's
   TPU runtime, which is a TPU VM too, reached with ``tpu="local"``. Colab's
   old remote TPU (``COLAB_TPU_ADDR``, a grpc address) is retired
   (tensorflow/tensorflow#70827), so that variable is ignored;
6. otherwise one local process.
"""

import dataclasses
import json
import os

TASK_TYPES = ("chief", "worker", "ps", "evaluator")
SLURM_PORT_BASE = 8888  # SlurmClusterResolver's default
K8S_PORT = 2222  # the port Kubeflow's TFJob gives every replica; TFPAR_PORT overrides it
TPU_VM_DEVICES = ("/dev/accel0", "/dev/vfio/0")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the cluster."""

    task_type: str = "worker"
    task_index: int = 0
    num_workers: int = 1  # chief + workers: the processes that compute gradients
    num_ps: int = 0
    source: str = "local"  # local | explicit | tf_config | slurm | kubeflow | kubernetes | tpu
    cluster_spec: dict = dataclasses.field(default_factory=dict)
    tpu: str | None = None  # TPU name, grpc:// address, or "local" on a Cloud TPU VM
    visible_gpus: str | None = None  # Slurm, several tasks per node: this task's GPU ids

    @property
    def is_chief(self):
        """The chief writes checkpoints and summaries (worker 0 when there is no chief)."""
        if "chief" in self.cluster_spec:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def task_name(self):
        return f"{self.task_type}-{self.task_index}"

    def tf_config(self):
        """This task as a TF_CONFIG JSON string (what a process started by hand for this task needs)."""
        return json.dumps({"cluster": self.cluster_spec, "task": {"type": self.task_type, "index": self.task_index}})

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


def from_explicit(cluster):
    """A ``ClusterInfo`` from what a user passed: ``ClusterInfo``, TF_CONFIG dict or JSON string."""
    if isinstance(cluster, ClusterInfo):
        return cluster
    if isinstance(cluster, dict):
        return from_tf_config(json.dumps(cluster), source="explicit")
    if isinstance(cluster, str):
        return from_tf_config(cluster, source="explicit")
    raise ClusterError(f"cluster must be a ClusterInfo, a TF_CONFIG dict or JSON string, got {type(cluster).__name__}.")


def is_kubeflow(env):
    """A TFJob replica: TF_CONFIG set by the operator inside a Kubernetes pod."""
    return bool(env.get("TF_CONFIG")) and bool(env.get("KUBERNETES_SERVICE_HOST"))


def from_indexed_job(env):
    """``ClusterInfo`` for a pod of a Kubernetes Indexed Job (no operator), or ``None`` outside one.

    Kubernetes sets ``JOB_COMPLETION_INDEX`` in every pod of an Indexed Job and,
    with ``subdomain`` naming a headless Service, gives pod ``i`` the DNS name
    ``<job>-<i>.<service>``. The hosts come from ``TFPAR_WORKER_HOSTS``
    (comma-separated ``host`` or ``host:port``) or are derived from
    ``TFPAR_JOB_NAME``, ``TFPAR_SERVICE`` and ``TFPAR_NUM_WORKERS`` (the Job's
    ``completions``); ``TFPAR_PORT`` (default 2222) is the port of hosts given
    without one. Worker 0 is the chief.
    """
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    hosts_raw, job = env.get("TFPAR_WORKER_HOSTS", "").strip(), env.get("TFPAR_JOB_NAME", "").strip()
    if not hosts_raw and not job:
        return None  # some other Indexed Job: not a tfpar cluster description

    def number(name, value, least):
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = None
        if n is None or n < least:
            raise ClusterError(f"{name}={value!r} must be an integer >= {least}.")
        return n

    port = number("TFPAR_PORT", env.get("TFPAR_PORT", K8S_PORT), 1)
    index = number("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"], 0)
    if hosts_raw:
        hosts = [h.strip() for h in hosts_raw.split(",")]
        if not all(hosts):
            raise ClusterError(f"TFPAR_WORKER_HOSTS={hosts_raw!r} has an empty entry; give 'host[:port],host[:port],...'.")
    else:
        service = env.get("TFPAR_SERVICE", "").strip()
        if not service or "TFPAR_NUM_WORKERS" not in env:
            raise ClusterError("TFPAR_JOB_NAME is set but TFPAR_SERVICE (the headless Service) or "
                               "TFPAR_NUM_WORKERS (the Job's completions) is not; set both, or TFPAR_WORKER_HOSTS.")
        count = number("TFPAR_NUM_WORKERS", env["TFPAR_NUM_WORKERS"], 1)
        hosts = [f"{job}-{i}.{service}" for i in range(count)]
    addresses = [h if ":" in h else f"{h}:{port}" for h in hosts]
    if len(set(addresses)) != len(addresses):
        raise ClusterError(f"TFPAR_WORKER_HOSTS lists an address twice ({hosts_raw}).")
    if index >= len(addresses):
        raise ClusterError(f"JOB_COMPLETION_INDEX={index} is out of range for {len(addresses)} worker(s) "
                           f"(0..{len(addresses) - 1}); make the Job's completions match.")
    if len(addresses) == 1:
        return ClusterInfo(source="kubernetes")
    return ClusterInfo(task_type="worker", task_index=index, num_workers=len(addresses), source="kubernetes",
                       cluster_spec={"worker": addresses})


def from_slurm(env, port_base=SLURM_PORT_BASE):
    """``ClusterInfo`` for a Slurm job step, or ``None`` outside one.

    Same layout as ``tf.distribute.cluster_resolver.SlurmClusterResolver``,
    read from the environment only (no ``scontrol``). With several tasks on a
    node and ``SLURM_GPUS_ON_NODE`` known, each task gets an equal share of
    the node's GPUs in ``visible_gpus`` unless Slurm already bound them
    (``CUDA_VISIBLE_DEVICES`` set).
    """
    if "SLURM_PROCID" not in env:
        return None
    from tfpar.core import internals

    expand_hostlist = internals.get("slurm_expand_hostlist")
    expand_tasks_per_node = internals.get("slurm_expand_tasks_per_node")

    def number(name, value):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ClusterError(f"{name}={value!r} is not an integer.") from None

    num_tasks = number("SLURM_STEP_NUM_TASKS", env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    rank = number("SLURM_PROCID", env["SLURM_PROCID"])
    if num_tasks <= 1:
        return ClusterInfo(source="slurm")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not per_node:
        raise ClusterError("Slurm step has several tasks but no SLURM_STEP_NODELIST / SLURM_STEP_TASKS_PER_NODE.")
    try:
        hosts = expand_hostlist(nodelist)
        counts = expand_tasks_per_node(per_node)
    except ValueError as err:
        raise ClusterError(f"Cannot read the Slurm node list: {err}.") from None
    if len(hosts) != len(counts) or sum(counts) != num_tasks:
        raise ClusterError(f"Slurm lists {len(hosts)} node(s) with {sum(counts)} task(s) ({per_node}), "
                           f"but the step has {num_tasks} task(s).")
    if not 0 <= rank < num_tasks:
        raise ClusterError(f"SLURM_PROCID={rank} is out of range for {num_tasks} task(s).")
    addresses, locals_ = [], []
    for host, count in sorted(zip(hosts, counts)):
        for local in range(count):
            addresses.append(f"{host}:{port_base + local}")
            locals_.append((local, count))
    local, on_node = locals_[rank]
    visible = None
    gpus_on_node = env.get("SLURM_GPUS_ON_NODE")
    if on_node > 1 and gpus_on_node and not env.get("CUDA_VISIBLE_DEVICES"):
        share = number("SLURM_GPUS_ON_NODE", gpus_on_node) // on_node
        if share >= 1:
            visible = ",".join(str(g) for g in range(local * share, (local + 1) * share))
    return ClusterInfo(task_type="worker", task_index=rank, num_workers=num_tasks, source="slurm",
                       cluster_spec={"worker": addresses}, visible_gpus=visible)


def from_tpu_env(env, path_exists=os.path.exists):
    """``ClusterInfo`` with source ``tpu`` when a TPU is reachable, else ``None``."""
    if env.get("TPU_NAME"):
        return ClusterInfo(source="tpu", tpu=env["TPU_NAME"])
    if env.get("TPU_ACCELERATOR_TYPE") or any(path_exists(p) for p in TPU_VM_DEVICES):
        return ClusterInfo(source="tpu", tpu="local")
    return None


def detect(cluster=None, environ=None, path_exists=os.path.exists):
    """This process's ``ClusterInfo``: ``cluster`` if given, else from the environment."""
    if cluster is not None:
        return from_explicit(cluster)
    env = os.environ if environ is None else environ
    if env.get("TF_CONFIG"):
        return from_tf_config(env["TF_CONFIG"], source="kubeflow" if is_kubeflow(env) else "tf_config")
    return from_indexed_job(env) or from_slurm(env) or from_tpu_env(env, path_exists) or ClusterInfo()


def tpu_address(tpu=None, cluster=None, environ=None, path_exists=os.path.exists):
    """The ``tpu`` argument for ``TPUClusterResolver``: the one given, else the detected one."""
    if tpu:
        return tpu
    info = cluster if cluster is not None else detect(environ=environ, path_exists=path_exists)
    if info.tpu:
        return info.tpu
    raise ValueError("No TPU found: run on a Cloud TPU VM or a Colab TPU runtime (tpu='local'), "
                     "set TPU_NAME, or pass tpu='name or grpc://host:port'.")


def tpu_resolver(tpu=None, cluster=None):
    """A ``TPUClusterResolver`` for the given or detected TPU (used by ``strategies.create('tpu')``)."""
    import tensorflow as tf

    return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address(tpu, cluster))


def pin_gpus(info, environ=None):
    """Restrict this task to its GPU share (Slurm, several tasks per node) before TF sees devices."""
    env = os.environ if environ is None else environ
    if info.visible_gpus and not env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = info.visible_gpus
        return True
    return False
