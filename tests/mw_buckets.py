"""One worker of multi-worker training with and without gradient buckets (run by test_buckets through tfpar-launch).

Usage: python mw_buckets.py OUT_DIR
Trains a small conv net with BatchNormalization for 3 steps in several
configurations, all in this one process (one cluster start-up for all), and
writes OUT_DIR/<task>.json: per configuration the final weights, the losses,
and how many all-reduce collectives (CollectiveReduceV2 ops) its train step
graph holds, next to the buckets tfpar.step.all_reduce.plan made.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from helpers import write_worker_result  # noqa: E402
from tfpar.step import all_reduce, steps, xla  # noqa: E402
from tfpar.runtime import precision, strategies

BUCKET_MB = 0.001  # ~1 KB: the net below (about 3,600 float32 weights) gets several buckets

CONFIGS = {  # name -> (bucket MiB, all-reduce dtype, micro-batches, jit_compile, precision)
    "keras_single_batch": (0, "float32", 1, "off", "float32"),
    "bucketed": (BUCKET_MB, "float32", 1, "off", "float32"),
    "bucketed_default": (all_reduce.DEFAULT_BUCKET_MB, "float32", 1, "off", "float32"),
    "bf16_single_batch": (0, "bfloat16", 1, "off", "float32"),
    "bf16_bucketed": (BUCKET_MB, "bfloat16", 1, "off", "float32"),
    "accumulated": (0, "float32", 2, "off", "float32"),
    "accumulated_bucketed": (BUCKET_MB, "float32", 2, "off", "float32"),
    "xla_bucketed": (BUCKET_MB, "float32", 1, "on", "float32"),
    "xla_accumulated_bucketed": (BUCKET_MB, "float32", 2, "on", "float32"),
    "fp16_bucketed": (BUCKET_MB, "float32", 1, "off", "mixed_float16"),
}


def fit(strategy, task_index, bucket_mb, dtype, micro, jit, policy):
    precision.apply(policy, strategy)
    rng = np.random.default_rng(task_index)  # each worker its own shard
    x = rng.normal(size=(96, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 96)
    keras.utils.set_random_seed(1)  # the same initial weights on every worker and in every configuration
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax", dtype="float32")])
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    all_reduce.apply(model.optimizer, dtype, strategy.num_replicas_in_sync)
    xla.enable(model, jit)
    steps.accumulate(model, micro)
    in_effect = all_reduce.buckets(model, bucket_mb)
    graphs = []
    step = model.train_step

    def recording_step(data):
        out = step(data)
        graphs.append(tf.compat.v1.get_default_graph())
        return out

    model.train_step = recording_step
    initial = np.concatenate([w.ravel() for w in model.get_weights()])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8 * micro, drop_remainder=True).take(3)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    collectives = sum(op.type == "CollectiveReduceV2" for op in graphs[-1].get_operations())
    sizes = [int(np.prod(w.shape)) * 4 for w in model.trainable_weights]
    keras.mixed_precision.set_global_policy("float32")
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    return {"weights": weights.tolist(), "moved": float(np.abs(weights - initial).max()),
            "loss": history.history["loss"], "collectives": collectives, "bucket_mb": in_effect,
            "buckets": all_reduce.plan(sizes, int(bucket_mb * 2 ** 20)) if in_effect else None,
            "bn_statistics": sum("moving" in w.path for w in model.non_trainable_weights),
            "xla": xla.state(model).get("train"), "finite": bool(np.isfinite(weights).all())}


def main(out_dir):
    strategy = strategies.create("multi_worker")
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    results = {name: fit(strategy, task["index"], *config) for name, config in CONFIGS.items()}
    write_worker_result(out_dir, task, results)


if __name__ == "__main__":
    main(sys.argv[1])
