"""Run by tests/test_sharding.py in a subprocess with 4 virtual CPUs; writes results as JSON.

Not a test module: DTensor needs the logical devices set before TensorFlow
starts, which a shared pytest process cannot promise.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpar import sharding  # noqa: E402

MESHES = ["batch=4,model=1", "batch=2,model=2", "batch=1,model=4"]
STEPS = 3


def main(out_path):
    mesh_error = None
    try:
        sharding.mesh("batch=3,model=1", virtual_cpus=4)
    except ValueError as err:
        mesh_error = str(err)
    import keras
    import numpy as np

    from tfpar import models
    from tfpar.sharding import variables

    def build():
        return models.build("vgg11_bn", num_classes=8, input_shape=(32, 32, 3), width_multiplier=0.125, dropout=0.0)

    def sgd():
        return keras.optimizers.SGD(0.05, momentum=0.9)

    rng = np.random.RandomState(0)
    batches = [(rng.rand(8, 32, 32, 3).astype("float32"), rng.randint(0, 8, 8).astype("int32")) for _ in range(STEPS)]

    def reference(policy):
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=sgd(), loss="sparse_categorical_crossentropy")
        initial = model.get_weights()
        losses = [float(model.train_on_batch(x, y)) for x, y in batches]
        return initial, losses, model.get_weights()

    initial, ref_losses, ref_final = reference("float32")
    out = {"mesh_error": mesh_error, "reference": ref_losses, "runs": {}}
    for spec in MESHES:
        keras.mixed_precision.set_global_policy("float32")
        dmesh = sharding.mesh(spec)
        trainer = sharding.ShardedTrainer(build, dmesh, sharding.default_rules("vgg11"), optimizer=sgd)
        trainer.set_weights(initial)
        losses = [trainer.train_on_batch(x, y)["loss"] for x, y in batches]
        by_path = {w.path: w for w in trainer.model.weights}
        slots = {v.path.rpartition("/")[2]: v for v in trainer.optimizer.variables}
        out["runs"][spec] = {
            "losses": losses,
            "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(trainer.get_weights(), ref_final)),
            "shapes": {p: [list(by_path[p].shape), [list(s) for s in variables.local_shapes(by_path[p])]]
                       for p in ("fc1/kernel", "fc2/kernel", "predictions/kernel", "block1_conv1/kernel",
                                 "fc2/bias", "block1_conv1_bn/gamma")},
            "slot_shapes": {p: [list(s) for s in variables.local_shapes(slots[p])]
                            for p in ("fc1_kernel_momentum", "fc2_bias_momentum")},
        }
        if spec == "batch=2,model=2":
            out["checkpoint"] = checkpoint_round_trip(trainer, build, sgd, dmesh, batches, variables)
            out["fit"] = fit_with_callbacks(trainer, batches)

    # Mixed precision: bfloat16 compute, float32 weights, on the 2x2 mesh.
    _, bf16_ref, _ = reference("mixed_bfloat16")
    trainer = sharding.ShardedTrainer(build, sharding.mesh("batch=2,model=2"), sharding.default_rules("vgg11"), optimizer=sgd)
    trainer.set_weights(initial)
    out["bf16"] = {"reference": bf16_ref, "losses": [trainer.train_on_batch(x, y)["loss"] for x, y in batches],
                   "weight_dtypes": sorted({str(w.dtype) for w in trainer.model.weights})}
    keras.mixed_precision.set_global_policy("float32")
    with open(out_path, "w") as f:
        json.dump(out, f)


def checkpoint_round_trip(trainer, build, sgd, dmesh, batches, variables):
    import numpy as np

    from tfpar import sharding

    directory = os.path.join(tempfile.mkdtemp(), "ckpt")
    trainer.save(directory)
    saved = trainer.get_weights()
    saved_slots = [variables.host_value(v) for v in trainer.optimizer.variables]
    trainer.train_on_batch(*batches[0])  # move away from the saved state
    moved = max(float(np.abs(a - b).max()) for a, b in zip(trainer.get_weights(), saved))
    trainer.restore(directory)
    fresh = sharding.ShardedTrainer(build, dmesh, sharding.default_rules("vgg11"), optimizer=sgd).restore(directory)
    kernel = {w.path: w for w in fresh.model.weights}["fc1/kernel"]
    return {
        "moved": moved,
        "restored_equal": all(np.array_equal(a, b) for a, b in zip(trainer.get_weights(), saved)),
        "fresh_equal": all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), saved)),
        "fresh_slots_equal": all(np.array_equal(variables.host_value(v), s)
                                 for v, s in zip(fresh.optimizer.variables, saved_slots)),
        "fresh_fc1_local_shapes": [list(s) for s in variables.local_shapes(kernel)],
    }


def fit_with_callbacks(trainer, batches):
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    val = tf.data.Dataset.from_tensor_slices((x[:13], y[:13])).batch(8)  # 8 + a padded 5
    log_dir = tempfile.mkdtemp()
    history = trainer.fit(ds, epochs=2, steps_per_epoch=2, validation_data=val,
                          callbacks=[keras.callbacks.TensorBoard(log_dir, write_graph=False)], verbose=0)
    events = [os.path.join(d, f) for d, _, files in os.walk(log_dir) for f in files if "tfevents" in f]
    tags = set()
    for path in events:
        for record in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in record.summary.value)
    return {"history": history.history, "tags": sorted(tags),
            "evaluate": trainer.evaluate(val), "iterations": int(
                __import__("tfpar.sharding.variables", fromlist=["x"]).host_value(trainer.optimizer.iterations))}


if __name__ == "__main__":
    main(sys.argv[1])
