"""Strategy factory: a name and a few options -> a plain ``tf.distribute.Strategy``.

Validation is strict and happens before TensorFlow is touched, so a typo is
one clear ``ValueError`` instead of a stack trace from deep inside TF.
DTensor sharding is not a ``tf.distribute`` strategy; see ``tfpar.sharding``.
"""

import logging

import tensorflow as tf

from tfpar.core.devices import configure_virtual_cpus, local_devices

log = logging.getLogger("tfpar")

NAMES = ("auto", "one_device", "mirrored", "multi_worker", "tpu", "parameter_server")
MIRRORED_ALL_REDUCE = ("auto", "nccl", "hierarchical_copy", "reduce_to_one_device")
MULTI_WORKER_ALL_REDUCE = ("auto", "ring", "nccl")

# Which options each strategy takes; anything else is a user mistake.
_OPTIONS = {
    "auto": {"devices", "virtual_cpus", "cluster", "communication_timeout", "tpu"},
    "one_device": {"devices", "virtual_cpus"},
    "mirrored": {"devices", "virtual_cpus", "all_reduce", "num_packs"},
    "multi_worker": {"all_reduce", "communication_timeout", "bytes_per_pack", "cluster", "virtual_cpus"},
    "tpu": {"tpu", "cluster"},
    "parameter_server": {"cluster", "num_ps_shards", "min_shard_bytes"},
}


def _device_kind(name):
    """'/job:localhost/replica:0/task:0/device:GPU:1' -> 'GPU:1'."""
    return name.rsplit("device:", 1)[-1].upper() if "device:" in name else name.lstrip("/").upper()


def _jobs(strategy):
    """{job name: task count} of the strategy's cluster ({} when it has none)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec() if resolver is not None else None
    return {job: spec.num_tasks(job) for job in spec.jobs} if spec is not None else {}


def describe(strategy, cluster=None):
    """A plain name for ``strategy``, for people: 'one device (CPU)', 'mirrored ×2', 'multi-worker ×3', ...

    ``type(strategy).__name__`` can be a private TF class (``_DefaultDistributionStrategy``
    for the host CPU, ``CollectiveAllReduceStrategy`` for multi-worker); this never is.
    ``cluster`` (a ``tfpar.cluster.ClusterInfo``) names the tasks of a parameter-server cluster.
    """
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        return f"TPU ×{replicas}"
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        # ParameterServerStrategy's public cluster_resolver is None; ``cluster`` (a ClusterInfo) knows.
        jobs = {job: len(tasks) for job, tasks in cluster.cluster_spec.items()} if cluster else _jobs(strategy)
        if not jobs:
            return "parameter servers"
        workers, ps = jobs.get("worker", 0), jobs.get("ps", 0)
        return f"parameter servers ({workers} worker{'s' * (workers != 1)}, {ps} ps)"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        jobs = _jobs(strategy)
        workers = jobs.get("chief", 0) + jobs.get("worker", 0) or 1
        return f"multi-worker ×{workers}" + (f" ({replicas} replicas)" if replicas != workers else "")
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"mirrored ×{replicas}"
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        return f"one device ({_device_kind(strategy.extended.worker_devices[0])})"
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return "one device (GPU)" if tf.config.list_logical_devices("GPU") else "one device (CPU)"
    return f"{type(strategy).__name__.lstrip('_')} ×{replicas}"


def public_class(strategy):
    """TF's public class of ``strategy``, e.g. 'tf.distribute.MultiWorkerMirroredStrategy'.

    ``type(strategy).__name__`` would say ``CollectiveAllReduceStrategy`` or the private
    ``_DefaultDistributionStrategy``; the default strategy is reported as ``tf.distribute.Strategy``.
    """
    exported = ((tf.distribute.TPUStrategy, "TPUStrategy"), (tf.distribute.experimental.TPUStrategy, "TPUStrategy"),
                (tf.distribute.ParameterServerStrategy, "ParameterServerStrategy"),
                (tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
                (tf.distribute.MirroredStrategy, "MirroredStrategy"), (tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"))
    for cls, name in exported:  # the class objects' own __name__ can differ from the exported name
        if isinstance(strategy, cls):
            return f"tf.distribute.{name}"
    return "tf.distribute.Strategy"


def _check(name, options):
    if name not in NAMES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of: {', '.join(NAMES)} (or 'dtensor' via tfpar.sharding).")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in _OPTIONS[name])
    if unknown:
        raise ValueError(
            f"Strategy {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(_OPTIONS[name]))}."
        )


def _one_device(devices):
    """``OneDeviceStrategy``, or TF's default strategy for the host CPU when no device is named.

    Keras 3.15 ``fit`` trained ResNet-18 (32 px, batch 64) 7-12% slower under
    ``OneDeviceStrategy("/cpu:0")`` than under the default strategy on the
    same CPU, with the same math (benchmarks/README.md). With no accelerator
    both run everything on that CPU, so the default strategy is the fast
    equivalent. A named device, or a GPU, keeps ``OneDeviceStrategy``.
    """
    if devices is not None and len(devices) != 1:
        raise ValueError(f"one_device takes exactly one device, got {list(devices)}.")
    device = devices[0] if devices else local_devices()[0]
    if devices is None and ":CPU:" in device.upper() and not tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    return tf.distribute.OneDeviceStrategy(device)


def _mirrored(devices, all_reduce, num_packs):
    all_reduce = all_reduce or "auto"
    if all_reduce not in MIRRORED_ALL_REDUCE:
        raise ValueError(f"all_reduce for mirrored must be one of {list(MIRRORED_ALL_REDUCE)}, got {all_reduce!r}.")
    if num_packs is not None:
        if all_reduce not in ("nccl", "hierarchical_copy"):
            raise ValueError(f"num_packs applies to all_reduce nccl or hierarchical_copy, not {all_reduce!r}.")
        if not isinstance(num_packs, int) or isinstance(num_packs, bool) or num_packs < 0:
            raise ValueError(f"num_packs must be an int >= 0, got {num_packs!r}.")
    packs = 1 if num_packs is None else num_packs
    ops = {
        "auto": None,
        "nccl": lambda: tf.distribute.NcclAllReduce(num_packs=packs),
        "hierarchical_copy": lambda: tf.distribute.HierarchicalCopyAllReduce(num_packs=packs),
        "reduce_to_one_device": lambda: tf.distribute.ReductionToOneDevice(),
    }[all_reduce]
    devices = list(devices) if devices else local_devices()
    on_cpus = all(":CPU:" in d.upper() for d in devices)
    if all_reduce == "nccl" and on_cpus:
        raise ValueError("all_reduce='nccl' needs GPUs; on CPU devices use 'auto' or 'reduce_to_one_device'.")
    if ops is None and on_cpus:
        ops = tf.distribute.ReductionToOneDevice  # NCCL cannot reduce between CPU devices
    return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops() if ops else None)


def communication_options(all_reduce="auto", communication_timeout=None, bytes_per_pack=None):
    """``tf.distribute.experimental.CommunicationOptions`` for multi-worker collectives.

    ``bytes_per_pack`` packs gradients into chunks of this size per
    all-reduce (fewer, larger messages; DESIGN.md item 12). Float16 gradient
    all-reduce is not offered: TF's CommunicationOptions has no compression
    field, and Keras 3 all-reduces inside a private optimizer method.
    """
    all_reduce = all_reduce or "auto"
    if all_reduce not in MULTI_WORKER_ALL_REDUCE:
        raise ValueError(f"all_reduce for multi_worker must be one of {list(MULTI_WORKER_ALL_REDUCE)}, got {all_reduce!r}.")
    if communication_timeout is not None and (
            isinstance(communication_timeout, bool) or not isinstance(communication_timeout, (int, float))
            or not communication_timeout > 0):
        raise ValueError(f"communication_timeout must be a positive number of seconds, got {communication_timeout!r}.")
    if bytes_per_pack is not None and (not isinstance(bytes_per_pack, int) or isinstance(bytes_per_pack, bool)
                                       or bytes_per_pack < 0):
        raise ValueError(f"bytes_per_pack must be an int >= 0 (0: one pack), got {bytes_per_pack!r}.")
    impl = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[all_reduce]
    kwargs = {"implementation": impl}
    if communication_timeout:
        kwargs["timeout_seconds"] = float(communication_timeout)
    if bytes_per_pack:
        kwargs["bytes_per_pack"] = bytes_per_pack
    return tf.distribute.experimental.CommunicationOptions(**kwargs)


def create(name="auto", *, devices=None, virtual_cpus=None, all_reduce=None, num_packs=None,
           communication_timeout=None, bytes_per_pack=None, cluster=None, tpu=None,
           num_ps_shards=None, min_shard_bytes=None):
    """Create the ``tf.distribute.Strategy`` called ``name``.

    Args:
      name: ``auto`` (TPU if reachable, multi_worker if the cluster has several
        workers, mirrored if several GPUs, else one_device), ``one_device``,
        ``mirrored``, ``multi_worker``, ``tpu`` or ``parameter_server``.
      devices: device names for one_device / mirrored (default: all local).
      virtual_cpus: split the CPU into this many logical devices first.
      all_reduce: mirrored: auto|nccl|hierarchical_copy|reduce_to_one_device;
        multi_worker: auto|ring|nccl.
      num_packs: gradient packs for mirrored's nccl / hierarchical_copy.
      communication_timeout: seconds before a multi-worker collective fails.
      bytes_per_pack: multi_worker gradient pack size in bytes (0/None: TF's default).
      cluster: a ``tfpar.cluster.ClusterInfo`` (or TF_CONFIG dict/JSON);
        default ``cluster.detect()``.
      tpu: TPU name or address for ``tpu`` (default: detected).
      num_ps_shards, min_shard_bytes: variable partitioning for parameter_server.

    Returns:
      A plain ``tf.distribute.Strategy``.
    """
    options = dict(devices=devices, virtual_cpus=virtual_cpus, all_reduce=all_reduce, num_packs=num_packs,
                   communication_timeout=communication_timeout, bytes_per_pack=bytes_per_pack,
                   cluster=cluster, tpu=tpu, num_ps_shards=num_ps_shards, min_shard_bytes=min_shard_bytes)
    _check(name, options)
    if cluster is not None:
        from tfpar.runtime import cluster as cluster_lib

        cluster = cluster_lib.detect(cluster)
    if virtual_cpus is not None:
        configure_virtual_cpus(virtual_cpus)
    if name == "auto":
        name = _auto_name(cluster, tpu)
        log.info("strategy=auto chose %s", name)
    if name == "one_device":
        strategy = _one_device(devices)
    elif name == "mirrored":
        strategy = _mirrored(devices, all_reduce, num_packs)
    elif name == "multi_worker":
        strategy = _multi_worker(cluster, all_reduce, communication_timeout, bytes_per_pack)
    elif name == "tpu":
        strategy = _tpu(cluster, tpu)
    else:
        strategy = _parameter_server(cluster, num_ps_shards, min_shard_bytes)
    log.info("strategy %s", describe(strategy))
    return strategy


def _auto_name(cluster, tpu=None):
    from tfpar.runtime import cluster as cluster_lib

    info = cluster or cluster_lib.detect()
    if tpu or info.source == "tpu":
        return "tpu"
    if info.num_ps > 0:
        return "parameter_server"
    if info.num_workers > 1:
        return "multi_worker"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored"
    return "one_device"


def _multi_worker(cluster, all_reduce, communication_timeout, bytes_per_pack):
    from tfpar.kerasfix import compat
    from tfpar.runtime import cluster as cluster_lib

    options = communication_options(all_reduce, communication_timeout, bytes_per_pack)
    info = cluster or cluster_lib.detect()
    cluster_lib.pin_gpus(info)  # Slurm, one task per GPU: before TF sees the devices
    compat.apply()  # Keras 3 needs these for fit/evaluate/predict under this strategy
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=info.resolver(), communication_options=options)


def _tpu(cluster, tpu):
    from tfpar.runtime import cluster as cluster_lib

    resolver = cluster_lib.tpu_resolver(tpu, cluster)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _parameter_server(cluster, num_ps_shards, min_shard_bytes):
    from tfpar.kerasfix import compat
    from tfpar.runtime import cluster as cluster_lib

    compat.apply()  # Keras 3 fit/evaluate need tfpar.kerasfix.ps_fit under this strategy
    info = cluster or cluster_lib.detect()
    shards = num_ps_shards or max(1, info.num_ps)
    partitioner = None
    if shards > 1:
        partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
            min_shard_bytes=min_shard_bytes or 256 << 10, max_shards=shards
        )
    return tf.distribute.ParameterServerStrategy(info.resolver(), variable_partitioner=partitioner)
