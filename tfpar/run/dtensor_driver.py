"""``tfpar-train --strategy=dtensor``: a ``TrainConfig`` trained on a DTensor mesh.

Same data, model, optimizer, loss, callbacks and summary fields as
``tfpar.train.fit_loop``, plus the mesh and the parameter bytes each device
holds: the model is built and compiled in ``layout_scope`` and trained by
Keras ``fit``. Default layout rules adapt to the mesh (and say how); rules
from ``--layout_rules`` are strict.
"""

import os


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
    from tfpar.parallel.sharding import rules as rules_lib

    path = getattr(config, "layout_rules", None)
    return rules_lib.load(path) if path else rules_lib.default_rules(config.model)


def _mesh_spec(config):
    spec = getattr(config, "mesh", None)
    if spec:
        return spec
    from tfpar.runtime import strategies

    if config.virtual_cpus:
        strategies.configure_virtual_cpus(config.virtual_cpus)
    return f"batch={len(strategies.local_devices())}"


def train(config, info, print_fn=print):
    """Train per ``config`` on the mesh ``config.mesh`` (default: every device on ``batch``).

    The ``tfpar.train.TRAINING_LOOPS["dtensor"]`` entry: returns the keys
    ``tfpar.train.fit_loop`` returns, plus the mesh, the layout rules and the
    parameter bytes in all and per device; ``tfpar.train.run`` adds the rest
    and writes the summaries.
    """
    from tfpar.run import data
    from tfpar.parallel.sharding import meshes, rules as rules_lib

    mesh_shape = meshes.parse(_mesh_spec(config))  # user mistakes first, before TF starts
    rules = _rules(config)
    batch_axis, replicas = next(iter(mesh_shape.items()))
    global_batch = config.global_batch_size(replicas)
    source = data.inspect(config.data, config.num_classes, config.seed)
    dtensor_env_from_cluster(info)

    import keras

    from tfpar.run import callbacks, recipe
    from tfpar.runtime import precision
    from tfpar.core import summary
    from tfpar.parallel.sharding import report, variables
    from tfpar.run.recipe import build_model, make_loss, make_optimizer

    dmesh = meshes.mesh(mesh_shape, virtual_cpus=config.virtual_cpus)
    policy = precision.apply(config.precision)
    keras.utils.set_random_seed(config.seed)
    # Every client reads the same global batches and packs its own devices' slices.
    pipes = data.make(config, global_batch, source)
    report.plan(lambda: build_model(config), rules, mesh_shape)  # rule errors as one clear sentence
    with variables.layout_scope(dmesh, rules, batch_axis=batch_axis) as layouts:
        model = build_model(config)
        optimizer, peak = make_optimizer(config, global_batch, pipes.steps_per_epoch)
        model.compile(optimizer=optimizer, loss=make_loss(config),
                      metrics=recipe.metrics(),
                      steps_per_execution=config.steps_per_execution)
        model.optimizer.build(model.trainable_variables)  # slots now, so the plan below counts them laid out
    variables.adapt_layers(model, layouts)
    rows = report.from_layouts(model, layouts)
    totals = report.totals(rows)

    chief = info.is_chief
    speak = chief or config.log_all_workers
    model_dir = config.model_dir if chief else os.path.join(config.model_dir, "workers", info.task_name)
    cbs, throughput = callbacks.for_run(config, model_dir, chief, global_batch, pipes.val is not None,
                                        print_fn=print_fn, task_name=info.task_name)
    name = f"DTensor {','.join(f'{k}={v}' for k, v in mesh_shape.items())}"
    if speak:
        for line in report.adaptations(rows):
            print_fn(line)
        print_fn(f"{name}: global batch {global_batch}, "
                 f"precision {policy}, {sum(1 for r in rows if any(r['spec']))} of {len(rows)} weights sharded, "
                 f"parameters {totals['param_bytes_per_device'] / 2**20:.2f} of {totals['param_bytes'] / 2**20:.2f} "
                 f"MiB per device, {pipes.steps_per_epoch} steps/epoch")
    history = model.fit(pipes.train, epochs=config.epochs, steps_per_epoch=pipes.steps_per_epoch,
                        validation_data=pipes.val, validation_steps=pipes.validation_steps if pipes.val else None,
                        callbacks=cbs, verbose=(config.verbose or 0) if speak else 0, shuffle=False)
    final = (model.evaluate(pipes.val, steps=pipes.validation_steps, return_dict=True, verbose=0)
             if pipes.val is not None else {})
    hist = history.history
    last = lambda key: float(hist[key][-1]) if hist.get(key) else None  # noqa: E731
    return {
        "strategy": name,  # plain words, like tfpar.strategies.describe
        "strategy_class": "tf.experimental.dtensor.Mesh",
        "replicas": replicas,
        "precision": policy,
        "global_batch_size": global_batch,
        "learning_rate_peak": peak,
        "jit_compile": False,
        "epochs_done": len(hist.get("loss", [])),
        "steps_done": sum(epoch["steps"] for epoch in throughput.epochs),
        "optimizer_updates": int(variables.host_value(model.optimizer.iterations)),
        "train_loss": last("loss"),
        "train_accuracy": last("accuracy"),
        "val_loss": float(final["loss"]) if final else None,
        "val_accuracy": float(final["accuracy"]) if final else None,
        "examples_per_sec": throughput.median_examples_per_sec(),
        "throughput_per_epoch": throughput.epochs,
        "weights_sha256": summary.arrays_checksum(model.get_weights()),
        "mesh": mesh_shape,
        "layout_rules": [[r.pattern, list(s)] for r, s in rules_lib.normalize(rules)],
        **totals,
    }
