"""``tfpar-train --strategy=dtensor``: a ``TrainConfig`` trained on a DTensor mesh.

Same inputs, callbacks and summary fields as ``tfpar.train.run``, plus the
mesh and the parameter bytes each device holds.
"""

import dataclasses
import hashlib
import json
import os
import time

import numpy as np


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


def _rules(config):
    from tfpar.sharding import rules as rules_lib

    path = getattr(config, "layout_rules", None)
    return rules_lib.load(path) if path else rules_lib.default_rules(config.model)


def _mesh_spec(config):
    spec = getattr(config, "mesh", None)
    if spec:
        return spec
    from tfpar import strategies

    if config.virtual_cpus:
        strategies.configure_virtual_cpus(config.virtual_cpus)
    return f"batch={len(strategies.local_devices())}"


def weights_checksum(trainer):
    """sha256 of every weight's float32 bytes in model order (as ``tfpar.summary.weights_checksum``)."""
    digest = hashlib.sha256()
    for value in trainer.get_weights():
        digest.update(np.ascontiguousarray(np.asarray(value, dtype=np.float32)).tobytes())
    return digest.hexdigest()


def run_config(config, cluster_info=None, print_fn=print):
    """Train per ``config`` on the mesh ``config.mesh`` (default: all devices on ``batch``)."""
    config.validate()
    from tfpar.sharding import meshes, rules as rules_lib

    mesh_shape = meshes.parse(_mesh_spec(config))  # user mistakes first, before TF starts
    rules = _rules(config)
    batch_parts = next(iter(mesh_shape.values()))
    if config.batch_size % batch_parts:
        raise ValueError(
            f"batch_size {config.batch_size} does not divide evenly over mesh axis "
            f"{next(iter(mesh_shape))!r} of size {batch_parts}; use a multiple of {batch_parts}."
        )
    if cluster_info is None:
        from tfpar import cluster as cluster_lib

        cluster_info = cluster_lib.detect()
    dtensor_env_from_cluster(cluster_info)

    import keras

    from tfpar import callbacks, data, models, precision, summary
    from tfpar.sharding import report
    from tfpar.sharding.trainer import ShardedTrainer
    from tfpar.train import _optimizer

    started = time.time()
    dmesh = meshes.mesh(mesh_shape, virtual_cpus=config.virtual_cpus)
    policy = precision.apply(config.precision)
    keras.utils.set_random_seed(config.seed)

    def build():
        return models.build(
            config.model, num_classes=config.num_classes, input_shape=(config.image_size, config.image_size, 3),
            width_multiplier=config.width_multiplier, bn_momentum=config.bn_momentum,
            weight_decay=config.weight_decay if config.optimizer != "adamw" else 0.0,
        )

    # Check every rule against the model's shapes without allocating anything.
    report.plan(build, rules, mesh_shape)
    trainer = ShardedTrainer(build, dmesh, rules, optimizer=lambda: _optimizer(config))
    rows = report.from_layouts(trainer.model, trainer.layouts)
    sharded = sum(1 for r in rows if any(r["spec"]))
    print_fn(f"mesh {','.join(f'{k}={v}' for k, v in mesh_shape.items())}: {sharded} of {len(rows)} weights sharded, "
             f"{report.totals(rows)['param_bytes_per_device'] / 2**20:.2f} MiB of parameters per device")

    (x_train, y_train), (x_val, y_val) = data.load_digits(config.image_size, seed=config.seed)
    train_ds = data.from_arrays(x_train, y_train, config.batch_size, training=True, seed=config.seed)
    val_ds = data.from_arrays(x_val, y_val, config.batch_size, training=False, drop_remainder=False)
    steps = config.steps_per_epoch or len(x_train) // config.batch_size

    chief = cluster_info.is_chief
    model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", cluster_info.task_name)
    throughput = callbacks.ThroughputLogger(
        config.batch_size, log_dir=os.path.join(model_dir, "train") if config.tensorboard else None,
        print_fn=print_fn if chief else None,
    )
    cbs = [throughput, keras.callbacks.TerminateOnNaN()]
    if config.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(log_dir=model_dir, write_graph=False))
    history = trainer.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps, validation_data=val_ds,
                          validation_steps=config.validation_steps, callbacks=cbs,
                          verbose=config.verbose if chief else 0)
    final = trainer.evaluate(val_ds, steps=config.validation_steps)
    from tfpar.sharding import variables as var_lib

    result = {
        "config": dataclasses.asdict(config),
        "strategy": "DTensor",
        "replicas": batch_parts,
        "precision": policy,
        "task": cluster_info.task_name,
        "num_workers": cluster_info.num_workers,
        "versions": summary.versions(),
        "epochs_done": len(history.history.get("loss", [])),
        "steps_done": int(var_lib.host_value(trainer.optimizer.iterations)),
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "val_loss": float(final["loss"]),
        "val_accuracy": float(final["accuracy"]),
        "examples_per_sec": throughput.median_examples_per_sec(),
        "wall_time_sec": time.time() - started,
        "weights_sha256": weights_checksum(trainer),
        "mesh": mesh_shape,
        "layout_rules": [[r.pattern, list(s)] for r, s in rules_lib.normalize(rules)],
        **report.totals(rows),
    }
    json.dumps(result, default=str)  # fail here, not half-way through the write
    summary.write_json_atomic(os.path.join(config.model_dir, f"summary.{cluster_info.task_name}.json"), result)
    if chief:
        summary.write_json_atomic(os.path.join(config.model_dir, "summary.json"), result)
    return result
