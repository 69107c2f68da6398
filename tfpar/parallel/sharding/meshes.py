"""DTensor meshes from a string such as ``"batch=2,model=2"``.

The first axis is the data-parallel one (batches are split along it); the
others shard weights. Parsing is pure Python so a typo fails before
TensorFlow starts.
"""

import os
import re

_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse(spec):
    """``"batch=2,model=2"`` -> ``{"batch": 2, "model": 2}`` (ordered), or ``ValueError``."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"A mesh is written like 'batch=2,model=2', got {spec!r}.")
        items = []
        for part in spec.split(","):
            name, sep, size = part.strip().partition("=")
            if not sep or not size.strip().isdigit():
                raise ValueError(f"Mesh axis {part.strip()!r} is not NAME=SIZE; write the mesh like 'batch=2,model=2'.")
            items.append((name.strip(), int(size)))
    shape = {}
    for name, size in items:
        if not _AXIS.match(str(name)):
            raise ValueError(f"Mesh axis name {name!r} is not an identifier; use names like 'batch' and 'model'.")
        if name in shape:
            raise ValueError(f"Mesh axis {name!r} appears twice in {spec!r}.")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Mesh axis {name!r} must have a positive size, got {size!r}.")
        shape[name] = size
    return shape


def device_count(shape):
    count = 1
    for size in shape.values():
        count *= size
    return count


def _device_type():
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        if tf.config.list_logical_devices(kind):
            return kind
    return "CPU"


def mesh(spec, device_type=None, virtual_cpus=None):
    """A ``dtensor.Mesh`` of the shape ``spec`` over this job's devices.

    With several DTensor clients (``DTENSOR_NUM_CLIENTS`` > 1, set per process
    together with ``DTENSOR_CLIENT_ID`` and ``DTENSOR_JOB_NAME``) the mesh
    spans every client's devices; otherwise the local devices. The shape must
    use every device: a mesh of 4 on 8 devices is a mistake, not a subset.

    Args:
      spec: ``"batch=2,model=2"`` or an ordered dict of axis sizes.
      device_type: ``"CPU"``, ``"GPU"`` or ``"TPU"``; default: the accelerator
        this process has, else CPU.
      virtual_cpus: split the CPU into this many logical devices first (tests
        and laptops); must run before TensorFlow initialises its devices.
    """
    shape = parse(spec)
    from tensorflow.experimental import dtensor

    from tfpar.core import devices as strategies

    if virtual_cpus is not None:
        strategies.configure_virtual_cpus(virtual_cpus)
    clients = dtensor.num_clients()
    if clients > 1:
        # Before anything initialises TensorFlow: listing logical devices would.
        device_type = (device_type or dtensor.preferred_device_type()).upper()
        try:
            dtensor.initialize_accelerator_system(device_type)
        except ValueError as err:
            if "already been initialized" not in str(err) or "Accelerator system" not in str(err):
                raise
        have = dtensor.num_global_devices(device_type)
    else:
        import tensorflow as tf

        device_type = (device_type or _device_type()).upper()
        have = len(tf.config.list_logical_devices(device_type))
    need = device_count(shape)
    if need != have:
        where = f"{clients} DTensor clients" if clients > 1 else "this process"
        text = ",".join(f"{k}={v}" for k, v in shape.items())
        raise ValueError(
            f"Mesh {text} needs {need} {device_type} devices but {where} has {have}; "
            f"make the axis sizes multiply to {have}."
        )
    dims = list(shape.items())
    if clients > 1:
        return dtensor.create_distributed_mesh(dims, device_type=device_type)
    return dtensor.create_mesh(dims, device_type=device_type)


def shape_of(dmesh):
    """The ordered ``{axis: size}`` of a ``dtensor.Mesh``."""
    return {name: dmesh.dim_size(name) for name in dmesh.dim_names}


def dtensor_env_from_cluster(info, environ=None):
    """Set DTensor's multi-client variables from a ``ClusterInfo`` (unless already set).

    DTensor reads ``DTENSOR_CLIENT_ID``, ``DTENSOR_NUM_CLIENTS``,
    ``DTENSOR_JOB_NAME`` and ``DTENSOR_JOBS`` (every client's host:port, in
    client order). Chief first, then workers, as in TF_CONFIG.
    """
    environ = os.environ if environ is None else environ
    if info is None or info.num_workers <= 1 or "DTENSOR_NUM_CLIENTS" in environ:
        return environ
    jobs = [*info.cluster_spec.get("chief", []), *info.cluster_spec.get("worker", [])]
    client = info.task_index + (len(info.cluster_spec.get("chief", [])) if info.task_type == "worker" else 0)
    environ.update({
        "DTENSOR_CLIENT_ID": str(client), "DTENSOR_NUM_CLIENTS": str(len(jobs)),
        "DTENSOR_JOB_NAME": "worker", "DTENSOR_JOBS": ",".join(jobs),
    })
    return environ
